"""The llama.cpp engine through the real daemon, real llama.cpp workers and the default model's real GGUF.

Exactness is asserted where llama.cpp's own kernels are deterministic: one compute thread (with two,
flash attention splits a sequence's cells between the threads by where they lie in the cache, so a
neighbour's cells can change its last bits; ``benchmarks/exactness.py`` measures how often) and
single-row decodes (batched rows round differently from single ones at near-ties: measured there
too).  Under those conditions a request preempted every 2 tokens and resumed from any tier gives the
same tokens as alone, and a state restored from its bytes continues bit for bit.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time

import jsonschema
import pytest

from ipc.client import ClientError, result_of
from tests.conftest import PROMPTS, DaemonProc, messages
from tests.test_migration import lone_request

pytest.importorskip("llama_cpp")

MAX_TOKENS = 16
LLAMA = ("--backend", "llamacpp", "--threads", "1")


@pytest.fixture(scope="module")
def gguf():
    from backends.model_store import default_gguf

    return default_gguf()


async def run_all(d, prompts=PROMPTS, **kw):
    async with d.aclient() as c:
        return await asyncio.gather(*(c.chat(messages(p), max_tokens=MAX_TOKENS, **kw) for p in prompts))


def start(start_daemon, gguf, *flags):
    return start_daemon(gguf, *LLAMA, *flags)


@pytest.fixture(scope="module")
def alone(gguf, tmp_path_factory):
    """The reference: each request alone (FIFO, one slot, nothing preempted)."""
    d = DaemonProc(gguf, tmp_path_factory.mktemp("llama-alone"), *LLAMA, "--policy", "fifo")
    try:
        return [r.token_ids for r in asyncio.run(run_all(d))]
    finally:
        d.stop()


def worker_stats(c) -> dict:
    return c.ps()["workers"][0]["stats"]


def settled_stats(c) -> dict:
    """A heartbeat the worker sent after everything it had been sent so far (one snapshot of its figures).

    The caller's last request is done, so the worker handled every message before it; the beat
    the daemon holds now may predate that, the one after it cannot.
    """
    c.chat("after", max_tokens=1)  # the worker handles messages in order: every earlier one is done
    first = worker_stats(c)["beat"]
    deadline = time.monotonic() + 60
    while True:
        st = worker_stats(c)
        if st["beat"] >= first + 1:
            return st
        assert time.monotonic() < deadline, st
        time.sleep(0.01)  # polling ps with a deadline for the next heartbeat, not synchronising on a guess


@pytest.mark.parametrize("tier", ["device", "host", "disk", "recompute"])
def test_preempted_every_two_tokens_from_each_tier_equals_alone(tier, gguf, start_daemon, alone):
    d = start(start_daemon, gguf, "--quantum-tokens", "2", "--snapshot-tier", tier, "--heartbeat-s", "0.05")
    results = asyncio.run(run_all(d))
    assert [r.token_ids for r in results] == alone
    assert {e.data["context"] for r in results for e in r.events if e.event == "preempted"} == {tier}
    for r in results:
        assert r.stats["preemptions"] > 0
        if tier == "recompute":
            assert r.stats["prompt_tokens_computed"] > r.usage["prompt_tokens"]
        else:  # swap tiers recompute nothing; the device tier copies nothing
            assert r.stats["prompt_tokens_computed"] + r.stats["prompt_tokens_reused"] == r.usage["prompt_tokens"]
            assert r.stats["decode_tokens_computed"] == r.usage["completion_tokens"] - 1
    assert sorted(d.state_dir.rglob("ctx-*")) == []
    with d.client() as c:
        st = settled_stats(c)
    assert st["kv_cells_used"] == 0  # every sequence freed in llama.cpp's cache
    assert sum(t["count"] for t in st["contexts"]["tiers"].values()) == 0


def test_state_bytes_restore_exactly(gguf):
    """get_data -> set_data into another sequence id and other cells: the same bytes, the same next logits."""
    import torch

    from backends import chat
    from backends.llama_model import LlamaModel
    from backends.llamacpp_engine import load_tokenizer

    m = LlamaModel(str(gguf), slots=2, ctx_size=2048, threads=1)
    try:
        ids = chat.render(load_tokenizer(gguf), messages(PROMPTS[0]))
        a, b, other = m.acquire(), m.acquire(), m.acquire()
        m.decode([(a, 0, ids)])
        data = m.get_state(a)
        m.decode([(other, 0, list(range(100, 157)))])  # cells in between: the copy lands elsewhere
        m.set_state(b, data, len(ids))
        moved = m.get_state(b)  # the same cells; only the sequence ids in its header differ
        la, lb = m.decode([(a, len(ids), [42])]), m.decode([(b, len(ids), [42])])
        assert torch.equal(la, lb)
        m.release(a, len(ids) + 1)
        m.set_state(a, moved, len(ids))  # and back under the first id: the very bytes it left as
        assert torch.equal(m.get_state(a), data)
        m.crop(a, len(ids), len(ids))
        for sid, n in ((a, len(ids)), (b, len(ids) + 1), (other, 57)):
            m.release(sid, n)
        assert m.cells_in_use() == 0 and m.held == 0
    finally:
        m.close()


def test_swapped_sequence_ids_keep_their_cells_and_owners(gguf):
    """``swap`` moves a sequence to another id (free or held) with the same next logits; owners follow."""
    from backends import chat
    from backends.llama_model import LlamaModel
    from backends.llamacpp_engine import load_tokenizer
    from backends.seq_ids import packing

    m = LlamaModel(str(gguf), slots=2, ctx_size=2048, threads=1)
    try:
        ids = chat.render(load_tokenizer(gguf), messages(PROMPTS[0]))
        a, b, c = m.acquire("A"), m.acquire("B"), m.acquire("C")
        m.decode([(a, 0, ids)])
        m.decode([(c, 0, ids[:20])])
        data = m.get_state(a)
        free = m.free_ids[0]
        m.swap(a, free)  # to a free id: ``a`` is free now
        assert m.owners[free] == "A" and a in m.free_ids and free not in m.free_ids
        m.swap(free, c)  # with a held id: the two exchange
        assert m.owners[c] == "A" and m.owners[free] == "C"
        m.set_state(a, data, len(ids))  # the untouched copy, for the reference logits
        assert torch_equal(m.decode([(c, len(ids), [42])]), m.decode([(a, len(ids), [42])]))
        rows = m.decode([(free, 20, [7]), (c, len(ids) + 1, [7])])  # unsorted rows: logits in row order
        assert torch_equal(rows[1], m.decode([(a, len(ids) + 1, [7])])[0])
        assert m.cells_in_use() == 2 * (len(ids) + 2) + 21
        for sid in (a, b, c, free):
            m.release(sid)
        assert m.cells_in_use() == 0
    finally:
        m.close()
    assert packing({0, 1, 2}, 8, lambda i: 0) == []
    assert packing({0, 2, 4}, 6, lambda i: 0) == [(4, 1)]
    assert packing({0, 5}, 6, lambda i: 10 if i == 1 else 0) == [(0, 4)]  # not over the held id 1


def torch_equal(x, y) -> bool:
    import torch

    return torch.equal(x, y)


def test_batched_rows_recompute_nothing_and_free_everything(gguf, start_daemon):
    d = start(start_daemon, gguf, "--slots", "3", "--quantum-tokens", "2", "--heartbeat-s", "0.05")
    results = asyncio.run(run_all(d))
    for r in results:
        assert r.usage["completion_tokens"] >= 1
        assert r.stats["prompt_tokens_computed"] + r.stats["prompt_tokens_reused"] == r.usage["prompt_tokens"]
    with d.client() as c:
        st = settled_stats(c)
        assert st["kv_cells_used"] == 0 and st["kv_seq_ids_free"] > 0


def test_thousand_requests_killed_cancelled_failed_leak_no_cell(gguf, start_daemon):
    """Finished, killed while running or suspended, and rejected requests: llama.cpp's cells return to zero."""
    d = start(start_daemon, gguf, "--slots", "4", "--quantum-tokens", "2", "--ctx-size", "2048",
              "--heartbeat-s", "0.05")  # fmt: skip
    short = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    too_long = [{"role": "user", "content": "word " * 1200}]
    outcomes = collections.Counter()

    async def one(c, i):
        kind = i % 4
        try:
            if kind == 3:
                await c.chat(too_long, max_tokens=2)
            elif kind == 2:  # killed after its first token (running, or suspended in the cache) or cancelled
                cid = await c.submit(short, max_tokens=200)
                pid = None
                async for ev in c.events(cid):
                    pid = ev.data["pid"] if ev.event == "accepted" else pid
                    if ev.event == "token":
                        break
                if i % 8 == 2:
                    await c.kill(pid)
                else:
                    await c.cancel(cid)
                outcomes["killed"] += 1
                return
            else:
                await c.chat(short, max_tokens=1 + kind)
            outcomes["finished"] += 1
        except ClientError as exc:
            outcomes[exc.code] += 1

    async def main():
        async with d.aclient() as c:
            for start_i in range(0, 1000, 50):
                await asyncio.gather(*(one(c, i) for i in range(start_i, start_i + 50)))

    asyncio.run(main())
    assert outcomes["context_length_exceeded"] == 250
    with d.client() as c:
        st = settled_stats(c)
    assert st["kv_cells_used"] == 0, st
    assert sum(t["count"] for t in st["contexts"]["tiers"].values()) == 0


def test_prompt_longer_than_the_context_fails_before_compute(gguf, start_daemon):
    d = start(start_daemon, gguf, "--ctx-size", "256", "--heartbeat-s", "0.05")
    with d.client() as c:
        with pytest.raises(ClientError) as err:
            c.chat("tell me " * 300, max_tokens=4)
        assert err.value.code == "context_length_exceeded"
        limit = int(err.value.message.rsplit(" ", 1)[-1])  # "... the model's context holds N"
        assert limit < 400 and worker_stats(c)["prefill_tokens"] == 0
        prompt = c.chat(messages(PROMPTS[4]), max_tokens=1).usage["prompt_tokens"]
        with pytest.raises(ClientError) as err:  # prompt + max_tokens one token over: refused by the daemon
            c.chat(messages(PROMPTS[4]), max_tokens=limit - prompt + 1)
        assert err.value.code == "context_length_exceeded"
        r = c.chat(messages(PROMPTS[4]), max_tokens=limit - prompt, min_tokens=limit - prompt)  # fills it exactly
        assert r.finish_reason == "length"
        assert r.usage["total_tokens"] == limit


def test_json_schema_and_tools_survive_preemption(gguf, start_daemon):
    from tests.test_structured import FORMAT, SCHEMA, WEATHER

    d = start(start_daemon, gguf, "--slots", "2", "--quantum-tokens", "2")

    async def both():
        async with d.aclient() as c:
            js = [c.chat(messages(f"Question {i}: is it raining?"), max_tokens=60, response_format=FORMAT)
                  for i in range(3)]  # fmt: skip
            tool = c.chat(messages("Weather in Oslo?"), max_tokens=40, tools=[WEATHER], tool_choice="required")
            return await asyncio.gather(*js, tool)

    *js, tool = asyncio.run(both())
    for r in js:
        jsonschema.validate(json.loads(r.text), SCHEMA)
        assert r.stats["preemptions"] > 0
    assert tool.finish_reason == "tool_calls"
    call = tool.tool_calls[0]["function"]
    assert call["name"] == "get_weather" and json.loads(call["arguments"])["city"] in ("Paris", "Rome", "Oslo")


def test_prompts_that_start_alike_share_their_prefix(gguf, start_daemon):
    """A prompt that starts like an earlier one prefills only the rest; the same prompt again computes nothing."""
    system = {"role": "system", "content": "You are a careful assistant. Answer in one short sentence."}

    def ask(d, q):
        with d.client() as c:
            return c.chat([system, {"role": "user", "content": q}], max_tokens=8)

    d = start(start_daemon, gguf, "--heartbeat-s", "0.05")
    first, other, again = ask(d, "Name a fruit."), ask(d, "Name a colour."), ask(d, "Name a fruit.")
    with d.client() as c:
        st = settled_stats(c)
    assert first.stats["prompt_tokens_reused"] == 0
    shared = other.stats["prompt_tokens_reused"]
    assert shared >= 16  # the system turn and "Name a"
    assert other.stats["prompt_tokens_computed"] == other.usage["prompt_tokens"] - shared
    assert again.stats["prompt_tokens_computed"] == 0  # joined with the kept state and logits
    assert again.stats["prompt_tokens_reused"] == again.usage["prompt_tokens"]
    assert again.token_ids == first.token_ids
    assert st["prefix_hits"] >= 2 and st["prefix_entries"] >= 2 and st["prefix_tokens_reused"] >= shared
    assert st["kv_cells_used"] == 0  # the kept prompts are host bytes: no sequence id, no cell
    off = start(start_daemon, gguf, "--prefix-cache", "0")
    ask(off, "Name a fruit.")
    assert ask(off, "Name a colour.").stats["prompt_tokens_reused"] == 0


LONG_QUESTION = (
    "Explain, step by step and with one example for each step, " + "how a compiler turns " * 12 + "source into code."
)


def test_prefill_chunk_bounds_a_step_only_while_rows_decode(gguf, start_daemon):
    """Alone, a prompt past ``--prefill-chunk`` prefills in one step; beside a decoding row, chunk by chunk."""
    d = start(
        start_daemon, gguf, "--slots", "2", "--prefill-chunk", "8", "--prefix-cache", "0", "--heartbeat-s", "0.05"
    )
    with d.client() as c, d.client() as other:
        steps = settled_stats(c)["prefill_steps"]
        alone = c.chat(messages(LONG_QUESTION), max_tokens=2)
        assert alone.stats["prompt_tokens_computed"] > 8 * 4
        # the request, then settled_stats' own one-token chat: one step each, however long the prompt
        assert settled_stats(c)["prefill_steps"] - steps == 2
        steps = settled_stats(c)["prefill_steps"]
        running = c.chat(messages("Count from one to fifty."), stream=True, max_tokens=48, min_tokens=48)
        first = next(e for e in running if e.event == "token")
        beside = other.chat(messages(LONG_QUESTION), max_tokens=2)  # sent while the first row decodes
        assert first.data and result_of([first, *running]).usage["completion_tokens"] == 48
        fed = settled_stats(c)["prefill_steps"] - steps - 2  # less the streaming row's and settled_stats' own
    assert beside.stats["prompt_tokens_computed"] == alone.stats["prompt_tokens_computed"]
    assert fed > 1, "a prompt fed beside a decoding row is cut at the chunk"


def test_session_keeps_its_sequence_resident(gguf, start_daemon):
    d = start(start_daemon, gguf)
    convo = [{"role": "user", "content": "Name a fruit."}]
    with d.client() as c:
        first = c.chat(list(convo), max_tokens=8, session="s1")
        convo += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And a color?"}]
        second = c.chat(list(convo), max_tokens=8, session="s1")
    assert first.stats["prompt_tokens_reused"] == 0
    assert second.stats["prompt_tokens_reused"] >= first.usage["prompt_tokens"]
    assert second.stats["prompt_tokens_computed"] < second.usage["prompt_tokens"] - first.usage["prompt_tokens"] + 8


def greedy_alone(gguf, prompts: list[str], n: int) -> list[list[int]]:
    """Each prompt alone, greedy, in a plain llama.cpp loop of single-row decodes (one thread)."""
    from backends import chat
    from backends.llama_model import LlamaModel
    from backends.llamacpp_engine import load_tokenizer

    tok, m = load_tokenizer(gguf), LlamaModel(str(gguf), slots=1, threads=1)
    eog, out = m.eog_ids, []
    try:
        for p in prompts:
            sid, ids, gen = m.acquire(), chat.render(tok, messages(p)), []
            logits = m.decode([(sid, 0, ids)])
            while len(gen) < n and (not gen or gen[-1] not in eog):
                gen.append(int(logits[0].argmax()))
                logits = m.decode([(sid, len(ids) + len(gen) - 1, gen[-1:])])
            m.release(sid, len(ids) + len(gen))
            out.append(gen)
    finally:
        m.close()
    return out


def test_migration_between_llamacpp_workers_changes_nothing(gguf, start_daemon):
    """As tests/test_migration.py for the HF engine: a context waiting on a busy worker moves to a free one."""
    prompts = [f"Request number {i}: tell me something." for i in range(3)]
    refs = greedy_alone(gguf, prompts, 60)
    d = start(start_daemon, gguf, "--workers", "2", "--quantum-tokens", "2", "--snapshot-tier", "host")
    with d.client() as c:
        cids = [c.submit(messages(p), max_tokens=60) for p in prompts]
        streams = [c.events(cid) for cid in cids]
        pids = [next(s).data["pid"] for s in streams]
        lone = lone_request(c, pids)
        c.kill(lone)
        results = {pid: result_of(list(s)) if pid != lone else list(s) for pid, s in zip(pids, streams, strict=True)}
    results.pop(lone)
    migrated = [e for r in results.values() for e in r.events if e.event == "resumed" and e.data.get("migrated")]
    assert len(migrated) >= 1
    for pid, ref in zip(pids, refs, strict=True):
        if pid in results:
            assert results[pid].token_ids == ref
            st = results[pid].stats  # migration recomputed nothing (a shared prompt prefix is not computed at all)
            assert st["prompt_tokens_computed"] + st["prompt_tokens_reused"] == results[pid].usage["prompt_tokens"]
