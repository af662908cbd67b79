"""The decode loop's per-row choices, for every local engine: the next token, and which quanta end.

``backends.local`` runs the loop; these are its rules, free of any model: a token is chosen
from a row's logits (greedy rows of one step in one argmax), under ``min_tokens`` without EOS,
through the row's grammar when it has one; after the step, rows whose quantum is over report it,
and with a time quantum so do the rows nearly done, so the daemon swaps them as a group.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from backends.sampling import choose, shape, shaped
from backends.sequence import Sequence


def greedy_rows(out: torch.Tensor | None, seqs: list[Sequence]) -> dict[int, int]:
    """Greedy choices, in one argmax, for the plain greedy rows whose logits are the last step's output.

    One argmax over the step's [B, vocab] logits ``out`` instead of one per row (half the time at
    B=16).  A row whose logits came from anywhere else (prefill, restore, migration) is left to
    ``choose``.
    """
    if out is None:
        return {}
    base = out.untyped_storage().data_ptr()
    rows = {}
    for seq in seqs:
        lg = seq.logits
        if seq.constraint is None and seq.params.temperature <= 0.0 and lg is not None and not shaped(seq.params):
            if lg.untyped_storage().data_ptr() == base:
                rows[seq.rid] = (lg.storage_offset() - out.storage_offset()) // out.stride(0)
    if not rows:
        return {}
    best = out.argmax(-1).tolist()
    return {rid: best[i] for rid, i in rows.items()}


def next_token(
    seq: Sequence,
    greedy: int | None,
    eos_ids: set[int],
    without_eos: Callable[[torch.Tensor], torch.Tensor],
) -> int:
    """The row's next token: its greedy choice from the step's argmax when that stands, else chosen here."""
    p = seq.params
    if greedy is not None and not (seq.under_min and greedy in eos_ids):
        return greedy
    if greedy is None and seq.constraint is None and p.temperature <= 0.0 and not shaped(p):
        greedy = int(torch.argmax(seq.logits))  # a row whose logits came from elsewhere (prefill, restore)
        if not (seq.under_min and greedy in eos_ids):
            return greedy  # (under ``min_tokens``, EOS masked only when it is the choice: one copy spared a step)
    logits = shape(seq.logits, p, seq.prompt_ids, seq.generated) if shaped(p) else seq.logits
    logits = logits if seq.constraint is None else seq.constraint.apply(logits)
    if seq.constraint is None and seq.under_min:
        logits = without_eos(logits)
    return choose(logits, p.temperature, p.top_p, seq.seed, len(seq.generated), p.top_k, p.min_p)


def quantum_ends(rows: list[Sequence]) -> list[Sequence]:
    """The rows of a step whose quantum ends now, to tell the daemon.

    Rows whose time quantum is nearly over end it with one that is over: the daemon then swaps a
    group of rows at once, and the newcomers prefill in one forward instead of one small forward
    per step.  Token quanta are always exact.
    """
    over = [seq for seq in rows if not seq.quantum.ended and seq.quantum.over()]
    if any(not seq.quantum.exact for seq in over):
        ending = {id(seq) for seq in over}
        over += [seq for seq in rows if id(seq) not in ending and not seq.quantum.ended and seq.quantum.nearly_over()]
    return over


def token_logprobs(logits: torch.Tensor, token: int, top: int, piece: Callable[[int], str]) -> dict:
    """OpenAI's logprobs entry of a chosen token, from the model's own logits (vLLM's raw logprobs).

    Raw: before the bias, penalties, grammar and temperature shaped the choice, so what a
    request reports is the model's view, the same on every engine and across preemption.
    """
    lp = torch.log_softmax(logits.reshape(-1).float(), dim=-1)

    def entry(i: int, v: float) -> dict:
        text = piece(i)
        return {"token": text, "logprob": v, "bytes": list(text.encode())}

    out = entry(token, float(lp[token]))
    if top > 0:
        vals, ids = torch.topk(lp, top)
        out["top_logprobs"] = [entry(i, v) for i, v in zip(ids.tolist(), vals.tolist(), strict=True)]
    else:
        out["top_logprobs"] = []
    return out
