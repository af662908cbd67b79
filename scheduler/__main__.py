"""``python -m scheduler``: the daemon's own entry for ``serve`` and ``config`` (``scheduler.launch``).

Every other command (``ps``, ``run``, ``top``, ``bench``, ...) belongs to the console above this
package; for the scripts that have always run ``python -m scheduler ps`` it is handed, unchanged,
to ``python -m console``.  Nothing in ``scheduler`` imports the console: this file is run, never
imported, and names the console only as a module to run.
"""

import runpy
import sys

if __name__ == "__main__":
    if sys.argv[1:2] in (["serve"], ["config"]):
        from scheduler.launch import main

        sys.exit(main())
    runpy.run_module("console", run_name="__main__", alter_sys=True)
