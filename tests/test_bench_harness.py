"""``quantad bench``: workloads, metrics math, min_tokens, and short sweeps on the tiny model."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace

import pytest

from benchmarks.harness.cli import bench_config
from benchmarks.harness.config import BenchConfig, parse_quanta
from benchmarks.harness.driver import Record
from benchmarks.harness.metrics import fair_share, jain, percentile, union_length
from benchmarks.harness.runner import run, sweep_points
from benchmarks.harness.workloads import make_workload
from ipc.client import ClientError
from tests.conftest import REPO, messages

# Small and fast on the tiny model: short answers, a few requests, every point a few seconds.
QUICK = ("--requests", "6", "--rate", "20", "--short-tokens", "3,6", "--long-tokens", "16,24",
         "--long-fraction", "0.4", "--long-threshold", "10", "--prompt-words", "8", "--slots", "2",
         "--no-progress")  # fmt: skip
FIELDS = ("overall", "by_class", "throughput", "preemptions", "switch", "context_bytes_moved", "fairness", "overhead")


def bench(tiny_model_dir, out, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "console", "bench", "--model", str(tiny_model_dir), "--out", str(out), *flags]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


# ---- pure units -------------------------------------------------------------------------
def test_workloads_are_seeded_and_reproducible():
    for kind in ("heavy-tail", "agents", "uniform"):
        cfg = BenchConfig(workload=kind, requests=30, seed=7)
        assert make_workload(cfg) == make_workload(cfg)
        assert make_workload(cfg) != make_workload(replace(cfg, seed=8))
        assert len(make_workload(cfg).all_calls) == 30


def test_heavy_tail_lengths_and_arrivals():
    cfg = BenchConfig(workload="heavy-tail", requests=400, rate=4.0, burstiness=3.0, seed=1)
    w = make_workload(cfg)
    long = [c for c in w.calls if c.cls == "long"]
    assert 0 < len(long) < len(w.calls) / 4  # a few long ones among many short
    assert all(200 <= c.max_tokens <= 400 for c in long)
    assert all(8 <= c.max_tokens <= 32 for c in w.calls if c.cls == "short")
    assert all(c.min_tokens == c.max_tokens for c in w.calls)  # --min-tokens max: exact lengths
    arrivals = [c.arrival_s for c in w.calls]
    assert arrivals == sorted(arrivals) and arrivals[0] == 0.0
    free = make_workload(replace(cfg, min_tokens="0"))
    assert all(c.min_tokens == 0 for c in free.calls)


def test_agents_workload_ids_and_sessions():
    cfg = BenchConfig(workload="agents", requests=20, agents=4, greedy_parallel=2, seed=3)
    w = make_workload(cfg)
    assert w.closed and len(w.all_calls) == 20
    assert {lp.agent for lp in w.loops} == {"agent0", "agent1", "agent2", "agent3"}
    greedy = [lp for lp in w.loops if lp.kind == "greedy"]
    assert {lp.agent for lp in greedy} == {"agent0", "agent1"} and len(greedy) == 4  # two loops each
    assert len({lp.session for lp in w.loops}) == len(w.loops)
    for lp in w.loops:
        assert [c.turn for c in lp.calls] == list(range(len(lp.calls)))
        assert all(c.session == lp.session and c.agent == lp.agent for c in lp.calls)
        assert all(c.cls == ("long" if lp.kind == "greedy" else "short") for c in lp.calls)
        assert all(c.think_s == 0 for c in lp.calls) or lp.kind == "polite"
    assert len({c.idx for c in w.all_calls}) == 20


def test_jain_index_and_percentiles():
    assert jain([5, 5, 5, 5]) == pytest.approx(1.0)
    assert jain([1, 0, 0, 0]) == pytest.approx(0.25)
    assert jain([1, 2, 3]) == pytest.approx(36 / 42)
    assert jain([]) is None
    assert percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)
    assert percentile([7], 99) == 7 and percentile([], 50) is None
    assert union_length([(0, 2), (1, 3), (5, 6)]) == pytest.approx(4.0)


def _served(agent: str, idx: int, start: float, end: float, times: list[float], prompt: int = 0) -> Record:
    return Record(idx=idx, agent=agent, session="", cls="short", turn=0, max_tokens=len(times), submit_s=start,
                  first_token_s=times[0], done_s=end, tokens=len(times), prompt_tokens=prompt,
                  arrivals=[(t, 1) for t in times])  # fmt: skip


def test_fair_share_counts_service_against_the_share_while_backlogged():
    # A asks all the time (0-10 s), B only for 0-5 s.  Fair: they split 0-5 s, then A has it all.
    a1 = _served("A", 0, 0.0, 10.0, [i * 0.2 + 0.1 for i in range(25)] + [5 + i * 0.1 + 0.05 for i in range(50)])
    b1 = _served("B", 1, 0.0, 5.0, [i * 0.2 + 0.2 for i in range(25)])
    share = fair_share([a1, b1], weights=(0.0, 1.0))
    assert share["A"] == pytest.approx(1.0, abs=0.05) and share["B"] == pytest.approx(1.0, abs=0.05)
    assert jain(share.values()) > 0.99  # the rate while backlogged would say 7.5 vs 5 tokens/s: 0.96
    # Starved: B waits 0-5 s while A takes everything, then gets served alone after A is done.
    a2 = _served("A", 0, 0.0, 5.0, [i * 0.1 + 0.05 for i in range(50)])
    b2 = _served("B", 1, 0.0, 7.5, [5 + i * 0.1 + 0.05 for i in range(25)])
    share = fair_share([a2, b2], weights=(0.0, 1.0))
    assert share["B"] < 0.7 < 1.3 < share["A"]
    # Prompts count with their weight, at the first token.
    a3 = _served("A", 0, 0.0, 4.0, [1.0, 2.0], prompt=10)
    b3 = _served("B", 1, 0.0, 4.0, [1.0, 2.0])
    share = fair_share([a3, b3], weights=(1.0, 1.0), bin_s=4.0)
    assert share["A"] == pytest.approx(12 / 7) and share["B"] == pytest.approx(2 / 7)


def test_sweep_points_and_quanta():
    assert parse_quanta("25, 100,inf") == [25.0, 100.0, math.inf]
    with pytest.raises(ValueError):
        parse_quanta("0")
    cfg = BenchConfig(policies=["fifo", "rr", "mlfq"], quanta=[25.0, math.inf])
    assert sweep_points(cfg) == [("fifo", math.inf), ("rr", 25.0), ("mlfq", 25.0), ("mlfq", math.inf)]
    assert ("rr", math.inf) in sweep_points(replace(cfg, policies=["rr"]))


# ---- min_tokens -------------------------------------------------------------------------
def test_min_tokens_overrides_stop_strings_and_keeps_output(tiny_model_dir, start_daemon):
    d = start_daemon(tiny_model_dir, "--quantum-tokens", "4")
    with d.client() as c:
        free = c.chat(messages("Say hello."), max_tokens=16, temperature=0.0)
        assert free.usage["completion_tokens"] == 16
        stop = free.text.strip()[:2]
        assert stop
        stopped = c.chat(messages("Say hello."), max_tokens=16, temperature=0.0, stop=[stop])
        assert stopped.finish_reason == "stop" and stopped.usage["completion_tokens"] < 16
        forced = c.chat(messages("Say hello."), max_tokens=16, min_tokens=16, temperature=0.0, stop=[stop])
        assert forced.usage["completion_tokens"] == 16 and forced.finish_reason == "length"
        assert forced.token_ids == free.token_ids and forced.text == free.text  # nothing else changes
        with pytest.raises(ClientError) as err:
            c.chat(messages("Say hello."), max_tokens=4, min_tokens=5)
        assert err.value.code == "bad_field"


def test_min_tokens_suppresses_eos(tiny_model_dir):
    """With EOS made the certain choice, min_tokens still gets its tokens (checked in the worker's engine)."""
    import torch

    from backends.hf_model import HFModel

    engine = HFModel(str(tiny_model_dir))
    logits = torch.zeros(1, engine.config.vocab_size)
    logits[0, sorted(engine.eos_ids)] = 100.0
    out = engine.without_eos(logits)
    assert int(torch.argmax(out)) not in engine.eos_ids
    assert int(torch.argmax(logits)) in engine.eos_ids  # the original is untouched (it is part of a snapshot)


# ---- sweeps on the tiny model -----------------------------------------------------------
def test_bench_heavy_tail_rr_fifo_writes_results(tiny_model_dir, tmp_path):
    out = tmp_path / "ht"
    r = bench(tiny_model_dir, out, "--workload", "heavy-tail", "--quanta", "30,inf", "--policies", "fifo,rr",
              "--no-peer", *QUICK)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert [p["label"] for p in data["points"]] == ["fifo", "rr q=30"]
    for p in data["points"]:
        assert p["error"] is None
        assert all(k in p["metrics"] for k in FIELDS)
        assert p["metrics"]["overall"]["requests"] == p["metrics"]["overall"]["ok"] == 6
        assert sorted(r["idx"] for r in p["records"]) == list(range(6))
        assert all(r["tokens"] == r["max_tokens"] for r in p["records"])  # min_tokens: exact lengths
        assert all("queue_s" in r["stats"] and "context_bytes_moved" in r["stats"] for r in p["records"])
    assert data["points"][0]["metrics"]["preemptions"]["total"] == 0  # FIFO never preempts
    assert {"rr_mean_jct_over_fifo", "rr_p99_ttft_short_over_fifo", "rr_tokens_per_s_over_fifo"} <= set(data["targets"])
    assert data["overhead"]["client_cpu_ms_per_request"] > 0
    md = (out / "results.md").read_text()
    assert "## Targets" in md and "rr_mean_jct_over_fifo" in md and "| rr q=30 |" in md
    for png in ("cdf_jct", "cdf_ttft", "jct_vs_quantum", "throughput_vs_quantum", "switching_vs_quantum"):
        assert (out / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| fifo |" in r.stdout  # the table is printed too


def test_bench_agents_workload_records_agents_and_sessions(tiny_model_dir, tmp_path):
    cfg = BenchConfig(workload="agents", policies=["rr"], quanta=[30.0], requests=8, agents=2, greedy_parallel=1,
                      short_tokens=(3, 6), long_tokens=(12, 16), long_threshold=10, prompt_words=8, think_s=0.05,
                      tool_s=0.05, slots=1, peer=False, progress=False, model=str(tiny_model_dir),
                      out=str(tmp_path / "ag"))  # fmt: skip
    result = run(cfg)
    (p,) = result["points"]
    assert p["error"] is None and p["label"] == "rr q=30"
    recs = p["records"]
    assert len(recs) == 8 and all(r["error"] is None for r in recs)
    assert {r["agent"] for r in recs} == {"agent0", "agent1"}
    assert {r["session"] for r in recs} == {"agent0-loop0", "agent1-loop0"}
    for session in ("agent0-loop0", "agent1-loop0"):
        turns = sorted((r["turn"], r["submit_s"], r["done_s"]) for r in recs if r["session"] == session)
        assert [t for t, _, _ in turns] == [0, 1, 2, 3]
        assert all(turns[i][2] <= turns[i + 1][1] for i in range(3))  # a loop waits for each answer
    assert p["metrics"]["fairness"]["agents"] == 2 and p["metrics"]["fairness"]["jain_rate"] is not None
    assert (tmp_path / "ag" / "results.md").exists()


def test_agents_chat_workload_resends_conversations_with_one_preamble():
    cfg = BenchConfig(workload="agents-chat", requests=20, agents=4, seed=2, preamble_words=50)
    w = make_workload(cfg)
    assert w.closed and len(w.all_calls) == 20 and len(w.loops) == 4
    assert [lp.kind for lp in w.loops] == ["greedy", "polite", "polite", "polite"]  # a quarter with long answers
    assert len({c.system for c in w.all_calls}) == 1 and len(w.all_calls[0].system.split()) > 50
    assert all(c.session == "" for c in w.all_calls)  # plain OpenAI clients: nothing names the program


def test_bench_agents_chat_over_http_reports_prompt_tokens_computed(tiny_model_dir, tmp_path):
    cfg = BenchConfig(workload="agents-chat", policies=["rr"], quanta=[50.0], requests=6, agents=2,
                      short_tokens=(3, 5), long_tokens=(8, 10), long_threshold=8, prompt_words=8, tool_s=0.02,
                      preamble_words=40, slots=2, peer=False, progress=False, model=str(tiny_model_dir),
                      out=str(tmp_path / "chat"))  # fmt: skip
    (p,) = run(cfg)["points"]
    assert p["error"] is None
    recs, agents = p["records"], p["metrics"]["agents"]
    assert len(recs) == 6 and all(r["error"] is None for r in recs)
    assert agents["prompt_tokens_computed"] < agents["prompt_tokens_sent"]  # later turns reuse earlier ones
    later = [r for r in recs if r["turn"] > 0]
    assert all(r["prompt_computed"] < r["prompt_tokens"] for r in later)
    assert "## Agents" in (tmp_path / "chat" / "results.md").read_text()


def test_bench_uniform_reports_a_rejected_policy(tiny_model_dir, tmp_path):
    out = tmp_path / "un"
    r = bench(tiny_model_dir, out, "--workload", "uniform", "--uniform-tokens", "3,8", "--quanta", "30,inf",
              "--policies", "fifo,nosuch", "--no-peer", *QUICK)  # fmt: skip
    assert r.returncode == 1
    assert "rejected policy 'nosuch'" in r.stderr
    data = json.loads((out / "results.json").read_text())
    fifo, bad, bad_inf = data["points"]
    assert fifo["error"] is None and fifo["metrics"]["overall"]["ok"] == 6
    assert "rejected policy 'nosuch'" in bad["error"] and bad_inf["error"] == bad["error"]
    assert "error: quantad serve rejected policy 'nosuch'" in (out / "results.md").read_text()


def test_bench_peer_row(tiny_model_dir, tmp_path):
    """The same workload against ``transformers serve --continuous-batching`` is its own row."""
    out = tmp_path / "peer"
    r = bench(tiny_model_dir, out, "--workload", "heavy-tail", "--quanta", "30", "--policies", "fifo",
              "--peer", *QUICK)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    fifo, peer = data["points"]
    assert peer["target"] == "peer" and peer["error"] is None
    assert peer["metrics"]["overall"]["ok"] == 6
    assert all(r["tokens"] == r["max_tokens"] and r["first_token_s"] is not None for r in peer["records"])
    assert "| transformers serve (peer) |" in (out / "results.md").read_text()


def test_min_tokens_validation():
    from ipc import protocol as P
    from ipc.chat_params import parse_chat

    base = {"op": "chat", "id": 1, "messages": messages("hi"), "max_tokens": 8}
    assert parse_chat(base)["min_tokens"] == 0
    assert parse_chat(base | {"min_tokens": 8})["min_tokens"] == 8
    for bad in (9, -1, 2.5, "4"):
        with pytest.raises(P.ProtocolError) as err:
            parse_chat(base | {"min_tokens": bad})
        assert err.value.code == P.E_BAD_FIELD


def test_harness_imports_no_torch():
    code = (
        "import sys, benchmarks.harness.runner, benchmarks.harness.plots, benchmarks.harness.cli;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'backends', 'contexts')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr


def test_bench_against_a_running_daemon(tiny_model_dir, start_daemon, tmp_path):
    d = start_daemon(tiny_model_dir, "--policy", "fifo")
    cfg = BenchConfig(workload="uniform", uniform_tokens=(3, 6), requests=4, rate=50.0, prompt_words=8,
                      endpoint=d.endpoint, peer=False, progress=False, out=str(tmp_path / "ep"))  # fmt: skip
    result = run(cfg)
    (p,) = result["points"]
    assert p["error"] is None and (p["policy"], p["quantum"], p["label"]) == ("fifo", "running", "fifo")
    assert p["metrics"]["overall"]["ok"] == 4
    assert (tmp_path / "ep" / "jct_vs_quantum.png").exists()


# ---- peers ------------------------------------------------------------------------------
def test_peer_flag_takes_names():
    from console.cli import build_parser

    def peers(*flags: str) -> list[str]:
        args = build_parser().parse_args(["bench", *flags])
        return bench_config(args).peer

    assert peers() == ["transformers"] and peers("--peer") == ["transformers"]  # as before: on by default
    assert peers("--no-peer") == [] and peers("--peer", "--no-peer") == []
    assert peers("--peer", "llama-server") == ["llama-server"]
    assert peers("--peer", "transformers,llama-server") == ["transformers", "llama-server"]
    assert peers("--peer=llama-server", "--slots", "2") == ["llama-server"]
    with pytest.raises(ValueError, match="unknown peer 'vllm'"):
        peers("--peer", "vllm")
    assert BenchConfig(peer=True).peer == ["transformers"] and BenchConfig(peer=False).peer == []  # the old bool
    assert BenchConfig().peer == ["transformers"] and BenchConfig().to_dict()["peer"] == ["transformers"]


def test_llama_server_missing_or_no_gguf_is_a_clear_error(tiny_model_dir, tmp_path, monkeypatch):
    from benchmarks.harness import servers

    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(servers.ServerError, match=r"llama-server is not built: run `make llama-server`"):
        servers.llama_server_exe()
    monkeypatch.undo()
    with pytest.raises(servers.ServerError, match="GGUF"):
        servers.resolve_gguf(str(tiny_model_dir))  # a safetensors directory


def test_bench_llama_server_peer(smollm2_dir, tmp_path):
    """``--peer llama-server``: llama.cpp's server on the default model's GGUF, same slots, its own row."""
    from benchmarks.harness.servers import ServerError, llama_server_exe

    try:
        llama_server_exe()
    except ServerError:
        pytest.skip("llama-server is not built (make llama-server)")
    out = tmp_path / "llama"
    cmd = [sys.executable, "-m", "console", "bench", "--model", "smollm2", "--out", str(out), "--policies", "rr",
           "--quanta", "30", "--peer", "llama-server", "--warmup", "0", *QUICK]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    rr, llama = data["points"]
    assert rr["label"] == "rr q=30" and rr["error"] is None
    assert (llama["label"], llama["target"], llama["error"]) == ("llama-server (peer)", "llama-server", None)
    assert llama["metrics"]["overall"]["ok"] == 6 and llama["metrics"]["throughput"]["tokens_per_s"] > 0
    assert all(r["tokens"] == r["max_tokens"] and r["first_token_s"] is not None for r in llama["records"])
    assert 0 < llama["startup_s"] < 120
    assert data["targets"]["rr_tokens_per_s_over_llama_server"] > 0
    assert {"rr_mean_jct_over_llama_server", "rr_p99_ttft_short_over_llama_server"} <= set(data["targets"])
    assert "| llama-server (peer) |" in (out / "results.md").read_text()
    log = (out / "logs" / "llama-server.log").read_text()
    assert "n_slots = 2" in log  # the same slot count as the daemon (QUICK: --slots 2)


def test_prefill_floor_of_a_report(tmp_path):
    """``benchmarks.prefill_floor``: the computed prompt tokens of a report's records, prefilled by plain llama.cpp."""
    pytest.importorskip("llama_cpp")
    from benchmarks import prefill_floor

    def record(reused: int, computed: int) -> dict:
        stats = {"prompt_tokens_reused": reused, "prompt_tokens_computed": computed}
        return {"prompt_tokens": reused + computed, "stats": stats}

    ttft = {"overall": {"ttft_s": {"p99": 3.0}}}
    points = [{"label": "rr q=100", "target": "quantad", "error": None, "metrics": ttft,
               "records": [record(0, 40), record(24, 30), record(24, 0), record(24, 9)]},
              {"label": "llama-server (peer)", "target": "llama-server", "error": None, "metrics": ttft}]  # fmt: skip
    assert prefill_floor.computed_prompts(points[0]["records"]) == [(0, 40), (24, 30), (24, 9)]
    assert [[len(r[2]) for r in part] for part in prefill_floor._fitting([(0, 0, [1] * 5), (1, 3, [2] * 4)], 6)] == [
        [5, 1],
        [3],
    ]
    report = str(tmp_path / "results.json")
    (tmp_path / "results.json").write_text(json.dumps({"points": points}))
    cmd = [sys.executable, "-m", "benchmarks.prefill_floor", report, "--slots", "2", "--rounds", "1"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "prefill floor: 79 prompt tokens of 3 requests in" in r.stdout
    assert "| llama-server (peer) | 3.00" in r.stdout
