"""Small parts with real tensors and the real tokenizer: contexts tiers, detokenizer, sampling."""

import torch
from transformers import AutoTokenizer

from backends.detok import TextStream
from backends.sampling import choose
from contexts.manager import ContextManager
from contexts.snapshot import Snapshot


def snap(n: int, fill: float) -> Snapshot:
    kv = [(torch.full((1, 2, n, 4), fill), torch.full((1, 2, n, 4), -fill)) for _ in range(2)]
    return Snapshot(layers=kv, logits=torch.full((1, 8), fill), meta={"n": n})


def test_tiers_respect_budgets_and_restore_exactly():
    one = snap(16, 1.0).nbytes
    cm = ContextManager("cpu", device_budget=one, host_budget=one)
    assert cm.snapshot(1, snap(16, 1.0)) == []
    assert cm.tier_of(1) == "device"
    moves = cm.snapshot(2, snap(16, 2.0))  # device full: the older one goes to host
    assert [(m.key, m.tier) for m in moves] == [(1, "host")]
    moves = cm.snapshot(3, snap(16, 3.0))  # host full too: the oldest drops to recompute
    assert {(m.key, m.tier) for m in moves} == {(2, "host"), (1, "recompute")}
    assert cm.used("device") <= one and cm.used("host") <= one
    back = cm.restore(2)
    assert torch.equal(back.layers[0][0], torch.full((1, 2, 16, 4), 2.0))
    assert torch.equal(back.logits, torch.full((1, 8), 2.0))
    lost = cm.restore(1)
    assert lost.layers is None and lost.meta == {"n": 16}
    cm.discard(3)
    assert cm.stats()["tiers"]["device"]["count"] == 0


def test_device_tier_is_in_place():
    cm = ContextManager("cpu", device_budget=1 << 30, host_budget=0)
    s = snap(8, 1.0)
    ptr = s.layers[0][0].data_ptr()
    cm.snapshot(7, s)
    assert cm.restore(7).layers[0][0].data_ptr() == ptr


def test_stop_string_never_streamed(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tok.encode("Hello world, this is the END of it")
    stream = TextStream(tok, ["END"])
    out, stopped = "", False
    for t in ids:
        delta, stopped = stream.push(t)
        out += delta
        if stopped:
            break
    assert stopped and out == "Hello world, this is the " and "E" not in out[-2:]


def test_detok_matches_full_decode(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    text = "Größe: 42 € — naïve café 🙂 done."
    stream = TextStream(tok, [])
    out = "".join(stream.push(t)[0] for t in tok.encode(text)) + stream.flush()
    assert out == tok.decode(tok.encode(text))


def test_sampling_is_a_function_of_seed_and_step():
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(0))
    a = [choose(logits, 0.9, 0.95, seed=5, step=i) for i in range(20)]
    b = [choose(logits, 0.9, 0.95, seed=5, step=i) for i in range(20)]
    c = [choose(logits, 0.9, 0.95, seed=6, step=i) for i in range(20)]
    assert a == b and a != c
    assert choose(logits, 0.0, 1.0, 0, 0) == int(torch.argmax(logits))


def test_budgets_shrink_to_what_the_machine_has():
    import psutil

    from contexts import pressure

    cm = ContextManager("cpu", device_budget=1 << 50, host_budget=1 << 50)
    limit = cm._under_pressure("host", 1 << 50)
    assert limit <= psutil.virtual_memory().total
    assert pressure.effective(100, 10, None) == 100 and pressure.effective(100, 10, 5) == 15


def test_json_problem_names_what_is_wrong():
    from backends.json_check import json_problem

    schema = {"type": "json_schema", "json_schema": {"schema": {"type": "object", "required": ["a"]}}}
    assert json_problem("anything", None) is None
    assert "invalid JSON" in json_problem("The answer is 4", {"type": "json_object"})
    assert "not an object" in json_problem("[1]", {"type": "json_object"})
    assert "schema" in json_problem('{"b": 1}', schema)
    assert json_problem('{"a": 1}', schema) is None
