"""Agents resending their conversations: whole conversations cached per identity, and agent programs.

Real daemons, real llama.cpp and HF workers, the default GGUF, the official ``openai`` client.  A
request's whole context (prompt and answer) stays in its worker's cache when it ends, so the next
turn that resends the conversation prefills only what is new (``usage.prompt_tokens_details``);
an identity reuses only its own entries.  A plain OpenAI conversation is a program of its own
(derived from its opening), which ``plas``, ``fair`` and the default ``rr`` schedule by.
"""

from __future__ import annotations

import asyncio

import pytest
from openai import OpenAI

from tests.conftest import DaemonProc, messages
from tests.test_llamacpp_engine import settled_stats

pytest.importorskip("llama_cpp")

LLAMA = ("--backend", "llamacpp", "--threads", "1", "--heartbeat-s", "0.05", "--http", "127.0.0.1:0")
TURNS = ["Name a fruit.", "And a colour?", "Now a number between one and ten."]


@pytest.fixture(scope="module")
def gguf():
    from backends.model_store import default_gguf

    return default_gguf()


def api(d: DaemonProc, token: str = "x") -> OpenAI:
    return OpenAI(base_url=d.urls["http"] + "/v1", api_key=token, max_retries=0, timeout=300)


def converse(client: OpenAI, model: str, turns: list[str], max_tokens: int = 12, stream: bool = False) -> list:
    """A conversation as agent frameworks hold it: each turn resends every message so far."""
    convo, out = [], []
    for turn in turns:
        convo.append({"role": "user", "content": turn})
        if stream:
            chunks = list(
                client.chat.completions.create(
                    model=model, messages=list(convo), max_tokens=max_tokens, temperature=0, stream=True,
                    stream_options={"include_usage": True},
                )
            )  # fmt: skip
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            usage = chunks[-1].usage
        else:
            r = client.chat.completions.create(model=model, messages=list(convo), max_tokens=max_tokens, temperature=0)
            text, usage = r.choices[0].message.content, r.usage
        out.append((text, usage))
        convo.append({"role": "assistant", "content": text})
    return out


def cache_stats(d: DaemonProc) -> dict:
    """The worker's cache as ``quantad workers`` shows it, from a heartbeat sent after every earlier request."""
    with d.client() as c:
        settled_stats(c)
        return c.workers()["workers"][0]["cache"]


def test_turns_reuse_the_whole_previous_conversation_and_say_so(gguf, start_daemon):
    d = start_daemon(gguf, *LLAMA)
    off = start_daemon(gguf, *LLAMA, "--cache-ram", "0")
    model = gguf.name
    turns = converse(api(d), model, TURNS)
    streamed = converse(api(d), model, [t + " " for t in TURNS], stream=True)  # another conversation, streamed
    plain = converse(api(off), model, TURNS)
    assert [t for t, _ in turns] == [t for t, _ in plain]  # the cache changes nothing of the text
    for results in (turns, streamed):
        for (_, before), (_, after) in zip(results, results[1:], strict=False):
            cached = after.prompt_tokens_details.cached_tokens
            # the previous prompt and its answer, less the answer's last token (never fed) and the
            # end-of-turn tokens the template renders after it
            assert cached >= before.prompt_tokens + before.completion_tokens - 3, (before, after)
            assert cached < after.prompt_tokens
    assert all(u.prompt_tokens_details.cached_tokens == 0 for _, u in plain)
    st = cache_stats(d)
    assert st["entries"] >= 2 and st["hits"] >= 4 and 0 < st["bytes"] <= st["budget"]


def test_an_edited_conversation_reuses_only_its_common_prefix_and_no_identity_another_s(gguf, start_daemon, tmp_path):
    (tmp_path / "tokens").write_text("alice tok-a\nbob tok-b\n")
    d = start_daemon(gguf, *LLAMA, "--http-token-file", str(tmp_path / "tokens"))
    model = gguf.name
    alice, bob = api(d, "tok-a"), api(d, "tok-b")
    system = {"role": "system", "content": "You answer in one short sentence. " * 6}
    first = [system, *messages("Name a large city in Europe.")]
    r1 = alice.chat.completions.create(model=model, messages=first, max_tokens=10, temperature=0)
    second = [*first, {"role": "assistant", "content": r1.choices[0].message.content}, *messages("Why?")]
    r2 = alice.chat.completions.create(model=model, messages=second, max_tokens=10, temperature=0)
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens
    # the same conversation with its first question edited: only the system turn is common
    edited = [system, *messages("Name a small town in Asia."), *second[2:]]
    r3 = alice.chat.completions.create(model=model, messages=edited, max_tokens=10, temperature=0)
    with d.client() as c:
        system_ids = len(c.tokenize(messages=[system], add_generation_prompt=False)["tokens"])
    assert system_ids - 4 <= r3.usage.prompt_tokens_details.cached_tokens <= system_ids + 6
    # bob sends alice's very conversation: nothing of hers is his
    b2 = bob.chat.completions.create(model=model, messages=second, max_tokens=10, temperature=0)
    assert b2.usage.prompt_tokens_details.cached_tokens == 0
    # (no text comparison here: alice's second turn prefilled only its suffix, bob's the whole prompt, and
    # llama.cpp's kernels for a 10-token and an 80-token batch round differently, which flipped a near-tie
    # in one run; tests/test_conversations.py's first test compares texts where the shapes agree)


def test_the_budget_holds_and_an_evicted_conversation_is_recomputed(gguf, start_daemon):
    d = start_daemon(gguf, *LLAMA, "--cache-ram", "6M")
    model, client = gguf.name, api(d)
    firsts = []
    for i in range(200):
        r = client.chat.completions.create(
            model=model, messages=messages(f"Conversation {i}: say a word."), max_tokens=3, temperature=0
        )
        firsts.append(r)
        if i % 50 == 0:
            st = cache_stats(d)
            assert st["bytes"] <= st["budget"] == 6 << 20
    st = cache_stats(d)
    assert st["bytes"] <= st["budget"] and st["entries"] < 200
    again = client.chat.completions.create(
        model=model, messages=messages("Conversation 0: say a word."), max_tokens=3, temperature=0
    )
    # evicted long ago: recomputed (the system turn may come from a later entry), and the same answer
    assert again.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens - 4
    assert again.choices[0].message.content == firsts[0].choices[0].message.content


def test_hf_engine_caches_conversations_too(tiny_model_dir, start_daemon):
    flags = ("--heartbeat-s", "0.05", "--http", "127.0.0.1:0")
    d, off = start_daemon(tiny_model_dir, *flags), start_daemon(tiny_model_dir, *flags, "--cache-ram", "0")
    model = tiny_model_dir.name
    turns, plain = converse(api(d), model, TURNS, max_tokens=6), converse(api(off), model, TURNS, max_tokens=6)
    assert [t for t, _ in turns] == [t for t, _ in plain]
    for (_, before), (_, after) in zip(turns, turns[1:], strict=False):
        assert after.prompt_tokens_details.cached_tokens >= before.prompt_tokens
    assert cache_stats(d)["hits"] >= 2


def test_plain_openai_conversations_are_programs_of_their_own(tiny_model_dir, start_daemon):
    d = start_daemon(tiny_model_dir, "--http", "127.0.0.1:0", "--policy", "plas")
    model, client = tiny_model_dir.name, api(d)

    def program(convo: list[dict]) -> str:
        r = client.chat.completions.create(model=model, messages=convo, max_tokens=3, temperature=0)
        return r.model_extra["quantad"]["stats"]["program"], r.choices[0].message.content

    a1, text = program(messages("first agent"))
    a2, _ = program([*messages("first agent"), {"role": "assistant", "content": text}, *messages("go on")])
    b1, _ = program(messages("second agent"))
    named = client.chat.completions.create(model=model, messages=messages("first agent"), max_tokens=2, user="u1")
    assert a1 == a2 and a1.startswith("conv:") and b1 != a1
    assert named.model_extra["quantad"]["stats"]["program"] == "agent:u1"  # HTTP's ``user`` names it


def test_plas_serves_a_short_program_s_turn_before_a_long_program_s(tiny_model_dir, start_daemon):
    """One slot: a program that has had much service waits behind a new program's turn (order, not time).

    Both turns are as long; round robin would alternate them and end the one sent first first.
    """
    d = start_daemon(tiny_model_dir, "--policy", "plas", "--slots", "1", "--quantum-tokens", "4")

    async def go() -> list[str]:
        async with d.aclient() as c:
            long_convo = messages("long answers here")
            for _ in range(3):  # the long program's earlier turns: its attained service
                await c.chat(long_convo, max_tokens=64, min_tokens=64)
            order: list[str] = []

            async def turn(name: str, convo) -> None:
                await c.chat(convo, max_tokens=24, min_tokens=24)
                order.append(name)

            await asyncio.gather(turn("long", [*long_convo, *messages("more")]), turn("short", messages("a new one")))
            return order

    assert asyncio.run(go()) == ["short", "long"]


def test_the_default_policy_serves_a_second_agent_before_one_agent_s_backlog(tiny_model_dir, start_daemon):
    d = start_daemon(tiny_model_dir, "--slots", "1", "--requests-per-identity", "5000")
    n = 2000

    async def go() -> int:
        async with d.aclient(agent="flood") as c:  # one socket: the daemon takes its messages in order
            backlog = [asyncio.ensure_future(c.chat(messages(f"flood {i}"), max_tokens=2)) for i in range(n)]
            await c.chat(messages("my turn?"), max_tokens=2, agent="other")  # sent after all of them
            done = sum(f.done() for f in backlog)
            for f in backlog:
                f.cancel()
            return done

    done = asyncio.run(go())
    assert done < n // 2, f"the second agent waited for {done} of the backlog's {n} requests"


def test_workers_show_the_cache(gguf, start_daemon):
    d = start_daemon(gguf, *LLAMA)
    converse(api(d), gguf.name, TURNS[:2], max_tokens=4)
    st = cache_stats(d)
    assert st["entries"] >= 1 and st["bytes"] > 0 and st["hits"] >= 1
