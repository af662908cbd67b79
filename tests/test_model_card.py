"""The context length is known from the model's files before any worker is up, and equals what the workers report.

``/v1/models`` and ``/tokenize`` answer ``max_model_len`` from the first moment the daemon
listens: read from a GGUF's header or a directory's ``config.json`` (``scheduler.model_card``),
with the llama.cpp engine's cells per sequence id taken into account.
"""

from __future__ import annotations

import pytest

from ipc.launcher import DaemonProcess
from scheduler import model_card
from tests.conftest import REPO


def test_a_gguf_header_and_a_config_give_the_trained_window(tiny_model_dir):
    from backends.model_store import default_gguf

    assert model_card.trained_context(str(default_gguf())) == 8192  # SmolLM2's llama.context_length
    assert model_card.trained_context(str(tiny_model_dir)) > 0
    assert model_card.trained_context(str(REPO)) is None  # no model there: unknown, not a guess


@pytest.mark.parametrize("engine", ["llamacpp", "hf"])
def test_the_context_length_is_known_before_the_workers_and_is_theirs(engine, tiny_model_dir, tmp_path):
    if engine == "llamacpp":
        pytest.importorskip("llama_cpp")
        from backends.model_store import default_gguf

        flags = ("--model", str(default_gguf()), "--backend", "llamacpp", "--slots", "2", "--ctx-size", "4096")
    else:
        flags = ("--model", str(tiny_model_dir), "--backend", "hf")
    env = {"QUANTAD_RUNTIME_DIR": str(tmp_path), "QUANTAD_STATE_DIR": str(tmp_path / "state")}
    d = DaemonProcess(*flags, endpoint=f"ipc://{tmp_path}/agents.sock", env=env, log=tmp_path / "d.log", cwd=REPO)
    d.spawn()
    try:
        with d.client(timeout=60) as c:
            early = c.stats()  # answered as soon as the daemon listens: its worker is still loading
            said = c.tokenize("hello")["max_model_len"]
            d.wait_ready(180)
            late = c.stats()
        assert early["max_context"] == said == late["max_context"] > 0, (early["workers"], said, late["max_context"])
        assert late["workers"]["up"] == 1
    finally:
        d.stop()
