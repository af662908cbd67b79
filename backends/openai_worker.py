"""The API worker, by its old name: ``python -m backends.worker --backend openai`` with the same flags.

The worker skeleton (``backends.worker``) drives the API engine (``backends.openai_engine``);
this module stays so that a command line naming it goes on working.
"""

from __future__ import annotations

import sys

from backends import worker


def main(argv: list[str] | None = None) -> int:
    return worker.main(["--backend", "openai", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
