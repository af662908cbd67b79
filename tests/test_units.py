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


def test_worker_spec_round_trips_through_the_one_worker_command_line():
    import sys

    from ipc.worker_spec import WorkerSpec, parser

    hf = WorkerSpec(endpoint="ipc:///tmp/q/w.sock", model="/m", slots=4, state_dir="/q", snapshot_tier="disk")
    hf = hf.named("w1")
    argv = hf.argv()
    assert argv[:3] == [sys.executable, "-m", "backends.worker"] and hf.state_dir == "/q/contexts/w1"
    assert WorkerSpec.parse(argv[3:]) == hf
    parsed = vars(parser().parse_args(argv[3:]))
    assert parsed["slots"] == 4 and parsed["snapshot_tier"] == "disk" and parsed["state_dir"] == "/q/contexts/w1"
    api = WorkerSpec(backend="openai", endpoint="e", model="remote", base_url="http://127.0.0.1:9/v1", api_key_env="K")
    api = api.named("w0")
    argv = api.argv()
    assert argv[:3] == [sys.executable, "-m", "backends.worker"] and argv[argv.index("--backend") + 1] == "openai"
    assert WorkerSpec.parse(argv[3:]) == api and "K" in argv  # where the key is, never the key


def test_scheduler_owns_request_changes_sessions_and_restarts():
    from ipc import messages as M
    from scheduler.core import Scheduler
    from scheduler.policies import Quantum, make_policy
    from scheduler.request import Request, State
    from scheduler.workers import Worker

    sched = Scheduler(make_policy("rr", Quantum(tokens=2)))
    for name in ("w0", "w1"):
        sched.workers[name] = Worker(name)
        sched.workers[name].up(M.Ready(worker=name, slots=1, preemptible=name == "w0"))
    chat = {"messages": [{"role": "user", "content": "hi"}], "session": "s", "stream": True, "seed": None}
    first = Request(1, b"a", 1, dict(chat))
    assert isinstance(first.params["seed"], int)  # fixed at accept: a restart samples the same stream
    sched.add(first)
    assert sched.schedule() == [first] and first.worker == "w0" and first.preemptible is True
    first.note_output([5, 6], "ab", 2)
    assert sched.quantum_end(first, 2, prompt_tokens=9) is False and first.quanta == 1 and first.prompt_tokens == 9
    sched.last_quantum(first)
    sched.keep_session(first)
    sched.finish(first, State.DONE)
    second = Request(2, b"a", 2, dict(chat))
    sched.add(second)
    assert second.worker == "w0"  # the worker keeping the session's context
    sched.schedule()
    sched.preempt(second, "host", 100, 0.5)
    assert (second.tier, second.context_bytes, second.moved, second.state) == ("host", 100, {"host": 100}, State.READY)
    sched.restart_on(second)
    assert (second.tier, second.context_bytes, second.restarts) == ("none", 0, 1)
    assert sched.worker_lost("w0") == [second] and not sched.workers["w0"].sessions and second.worker is None


def test_a_cuda_llamacpp_worker_preloads_libstdcxx_and_others_get_nothing():
    from ipc.worker_spec import CUDA_LLAMACPP_PRELOAD, WorkerSpec

    cuda = WorkerSpec(backend="llamacpp", device="cuda:1")
    assert cuda.env({}) == {"LD_PRELOAD": CUDA_LLAMACPP_PRELOAD}
    assert cuda.env({"LD_PRELOAD": "libjemalloc.so"}) == {"LD_PRELOAD": f"{CUDA_LLAMACPP_PRELOAD} libjemalloc.so"}
    assert cuda.env({"LD_PRELOAD": "/usr/lib/libstdc++.so.6"}) == {}  # the operator's own
    assert WorkerSpec(backend="llamacpp").env({}) == WorkerSpec(backend="hf", device="cuda").env({}) == {}


def test_bench_converts_the_model_only_when_a_daemon_or_peer_loads_the_directory():
    from benchmarks.harness.config import BenchConfig
    from benchmarks.harness.runner import needs_model_dir

    gguf = ["--backend=llamacpp"]
    assert not needs_model_dir(BenchConfig(serve_args=gguf, peer="llama-server"))
    assert not needs_model_dir(BenchConfig(serve_args=gguf, peer=""))
    assert needs_model_dir(BenchConfig(serve_args=gguf, peer="llama-server,transformers"))
    assert needs_model_dir(BenchConfig(peer="llama-server"))  # the HF engine's daemons
    assert not needs_model_dir(BenchConfig(endpoint="ipc:///tmp/x.sock", peer=""))
