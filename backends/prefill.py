"""The prefill line of a local engine: slots still feeding their prompt, in order, under a token budget.

Each step feeds at most ``prefill_chunk`` prompt tokens.  New short prompts go together in one
forward (``prefill_many``); the rest (long prompts, resumed prefixes, session suffixes) go in
chunks, one row at a time (``prefill``).  A short prompt is never split: when it does not fit what
is left of the budget, it waits for the next step, where it is prefilled whole (and batched with
the others waiting).  A row whose context is complete joins the batch with its logits.
A new prompt that starts like one prefilled before starts from its kept state (``backends.prefixes``).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from backends.prefixes import PrefixCache
from backends.sequence import Sequence

if TYPE_CHECKING:
    from backends.kv_engine import KvEngine

log = logging.getLogger("quantad.worker")
KEPT_FORKS = 2  # fork groups whose prompt state is kept for rows that come after their leader's prefill


class PrefillLine:
    def __init__(self, engine: KvEngine, chunk: int, prefix_budget: int = 0, offer_prompts: bool = True):
        self.engine = engine
        self.chunk = chunk
        self.prefixes = PrefixCache(prefix_budget)
        self.offer_prompts = offer_prompts  # else only ended requests' contexts are kept (``backends.local``)
        self.seqs: list[Sequence] = []
        self.forks: dict[int, list[Sequence]] = {}  # a leader's rid -> rows waiting for a copy of its prompt
        self.kept: OrderedDict[str, tuple[list[int], Any, Any]] = OrderedDict()  # fork group -> its prompt, copied
        self.steps = 0  # steps that fed prompt tokens (``ps`` shows it: how a budget split the prompts)

    def __bool__(self) -> bool:
        return bool(self.seqs)

    def __contains__(self, seq: Sequence) -> bool:
        return seq in self.seqs or any(seq in f for f in self.forks.values())

    def add(self, seq: Sequence) -> None:
        """A row to prefill; one of a ``fork`` group whose prompt another row is prefilling waits for a copy."""
        leader = self._leader(seq)
        if leader is not None:
            self.forks.setdefault(leader.rid, []).append(seq)
            return
        kept = self.kept.get(seq.params.fork)
        if kept is not None and self._fresh_row(seq) and kept[0] == seq.context_ids:  # it came after its leader's
            self._join_copy(seq, kept[1], kept[2])
            return
        if self.prefixes and self._fresh_row(seq) and self._share_prefix(seq):
            return
        self.seqs.append(seq)

    def _share_prefix(self, seq: Sequence) -> bool:
        """Start from the kept prompt sharing the longest prefix; True when it was this very prompt (it joined)."""
        ids, prefixes, engine = seq.context_ids, self.prefixes, self.engine
        common, entry = prefixes.longest(ids, seq.owner)
        if entry is None or (not self.offer_prompts and common <= entry.prompt):
            return False  # (an engine that shares no prompts takes an entry only to continue its conversation)
        if common == len(ids) and entry.whole(common):  # nothing to compute: its logits are kept too
            prefixes.tokens_reused += common
            self._join_copy(seq, entry.state, entry.logits)
            return True
        common = min(common, len(ids) - 1)  # at least one token is fed, for fresh logits
        seq.head_start(engine.crop(engine.fork(entry.state), common), common)  # (a row preempted mid-prefill
        # comes back fresh: counted once)
        prefixes.tokens_reused += common
        return False

    def remove(self, seq: Sequence) -> None:
        for followers in self.forks.values():
            if seq in followers:
                followers.remove(seq)
                return
        self.seqs.remove(seq)
        rest = self.forks.pop(seq.rid, [])
        if rest:  # the next of the group prefills in its place
            self.seqs.append(rest[0])
            self.forks[rest[0].rid] = rest[1:]

    @staticmethod
    def _fresh_row(seq: Sequence) -> bool:
        return not (seq.prefilled or seq.partial is not None or seq.generated)

    def _leader(self, seq: Sequence) -> Sequence | None:
        group = seq.params.fork
        if not group or not self._fresh_row(seq):
            return None
        return next(
            (s for s in self.seqs if s.params.fork == group and s.context_ids == seq.context_ids),
            None,
        )

    def _complete(self, seq: Sequence, state, logits) -> None:
        """A row's prompt is in: it joins the batch, and so does every row that waited for a copy of it."""
        engine, group = self.engine, seq.params.fork
        offer = self.prefixes and self.offer_prompts
        if (group or offer) and not seq.generated:  # its prompt alone (a restarted row holds more)
            kept = (list(seq.context_ids), engine.keep_copy(state), logits.clone())  # one copy serves both
            if group:
                self.kept[group] = kept
                while len(self.kept) > KEPT_FORKS:
                    self.kept.popitem(last=False)
            if offer:
                self.prefixes.offer(*kept, owner=seq.owner)
        for f in self.forks.pop(seq.rid, []):
            self._join_copy(f, state, logits)
        seq.logits = logits
        engine.join(seq, state)

    def keep_ended(self, seq: Sequence, state) -> None:
        """An ended row's whole context (prompt and answer) to the prefix cache: the next turn resends it.

        The state covers every id but the last one chosen (never fed); its logits are the ones that
        last token was chosen from, so a prompt that is exactly this context joins with nothing computed.
        The engine's own hold on the state is let go (llama.cpp: its cells; the copy is what is kept).
        """
        engine = self.engine
        n = engine.kv_length(state)
        logits = seq.logits.clone() if seq.logits is not None and n == len(seq.context_ids) - 1 else None
        try:
            ids = seq.context_ids[:n]
            self.prefixes.offer(ids, engine.keep_copy(state), logits, owner=seq.owner, prompt=len(seq.prompt_ids))
            self.prefixes.conversations += 1
        finally:
            engine.drop_partial(state)

    def _join_copy(self, seq: Sequence, state, logits) -> None:
        """A row of a fork group joins with a copy of its prompt's state: its prefill is not computed again."""
        seq.prefilled, seq.reused = len(seq.context_ids), seq.reused + len(seq.context_ids)
        seq.logits = logits.clone()
        self.engine.join(seq, self.engine.fork(state))

    def _fits_whole(self, seq: Sequence) -> bool:
        """A new prompt short enough to prefill in one go (with others: see ``_fresh``)."""
        return not seq.prefilled and seq.partial is None and len(seq.context_ids) <= self.chunk

    def run(self, budget: int = 0) -> None:
        """One step's budget of prefill (``chunk`` unless given): the new short prompts together, then chunks."""
        budget = budget or self.chunk
        if self.seqs:
            self.steps += 1
        budget = self._fresh(budget)
        for seq in list(self.seqs):
            if budget <= 0:
                break
            if seq not in self.seqs or (self._fits_whole(seq) and len(seq.context_ids) > budget):
                continue
            before = seq.prefilled
            try:
                self._feed(seq, budget)
            except Exception as exc:
                log.exception("request %s failed", seq.rid)
                self.engine.fail(seq, exc)
            budget -= max(seq.prefilled - before, 1)

    def plan(self) -> list[tuple[Sequence, list[int]]]:
        """One step's budget of prefill as chunks, in line order, for an engine that feeds them itself.

        llama.cpp feeds them in the same ``llama_decode`` as the decode rows (one pass over the
        weights per step, as llama-server does); each fed chunk is then reported with ``fed``.
        """
        budget, out = self.chunk, []
        for seq in self.seqs:
            if budget <= 0:
                break
            if self._fits_whole(seq) and len(seq.context_ids) > budget:
                continue
            ids = seq.context_ids[seq.prefilled : seq.prefilled + budget]
            out.append((seq, ids))
            budget -= len(ids)
        self.steps += bool(out)
        return out

    def fed(self, seq: Sequence, n: int, logits, seconds: float) -> None:
        """A planned chunk of ``n`` tokens went through the model: count it; a complete row joins the batch."""
        engine = self.engine
        engine.prefilled(n, seconds)
        seq.quantum.charge(seconds)
        seq.prefilled += n
        seq.prefill_computed += n
        if seq.prefilled < len(seq.context_ids):
            return
        self.seqs.remove(seq)
        state, seq.partial = engine.settle(seq.partial), None
        self._complete(seq, state, logits)

    def _feed(self, seq: Sequence, budget: int) -> None:
        """Feed the next chunk of a slot's context; when complete, the slot joins the batch."""
        engine, ids = self.engine, seq.context_ids
        chunk = ids[seq.prefilled : seq.prefilled + budget]
        t0 = time.perf_counter()
        seq.partial, logits = engine.prefill(chunk, seq.partial)
        dt = time.perf_counter() - t0
        engine.prefilled(len(chunk), dt)
        seq.quantum.charge(dt)
        seq.prefilled += len(chunk)
        seq.prefill_computed += len(chunk)
        if seq.prefilled < len(ids):
            return
        self.seqs.remove(seq)
        state, seq.partial = engine.settle(seq.partial), None
        self._complete(seq, state, logits)

    def _fresh(self, budget: int) -> int:
        """Prefill the new prompts at the head of the line that fit the budget together, in one forward."""
        group: list[Sequence] = []
        for seq in self.seqs:
            n = len(seq.context_ids)
            if not self._fits_whole(seq):
                continue
            if n > budget:
                break
            group.append(seq)
            budget -= n
        if len(group) < 2:
            return budget + sum(len(s.context_ids) for s in group)  # one alone takes the usual path
        engine = self.engine
        t0 = time.perf_counter()
        try:
            rows = engine.prefill_many([s.context_ids for s in group])
        except Exception as exc:
            log.exception("batched prefill failed")
            for seq in group:
                engine.fail(seq, exc)
            return budget
        dt, total = time.perf_counter() - t0, sum(len(s.context_ids) for s in group)
        engine.prefilled(total, dt)
        for seq, (state, logits) in zip(group, rows, strict=True):
            n = len(seq.context_ids)
            seq.quantum.charge(dt * n / total)
            seq.prefilled, seq.prefill_computed = n, seq.prefill_computed + n
            self.seqs.remove(seq)
            self._complete(seq, state, logits)
        return budget
