"""The batch's in-place swap (a newcomer written into a leaver's row) computes what each row does alone
(the same greedy token; logits equal up to the rounding of batched products)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backends.batch import Batch
from backends.hf_model import HFModel
from contexts.kv import cache_layers

PROMPTS = ["Tell me a joke.", "Describe a cat in one long sentence, please.", "Hi", "What is two plus two?"]


@dataclass(eq=False)
class Row:
    rid: int


def _own_kv(engine: HFModel, rid: int):
    cache, logits = engine.prefill(engine.render([{"role": "user", "content": PROMPTS[rid]}]))
    return [(k.clone(), v.clone()) for k, v in cache_layers(cache)], logits


def _greedy_steps(batch: Batch, logits: dict[int, torch.Tensor], n: int) -> None:
    for _ in range(n):
        rows, out = batch.step({s.rid: int(logits[s.rid].argmax()) for s in batch.seqs})
        for i, s in enumerate(rows):
            logits[s.rid] = out[i : i + 1]


def _alone(engine: HFModel, rid: int, steps: int) -> torch.Tensor:
    batch, logits = Batch(engine.model, engine.config), {}
    kv, logits[rid] = _own_kv(engine, rid)
    batch.add(Row(rid), kv)
    _greedy_steps(batch, logits, steps)
    return logits[rid]


@torch.inference_mode()
def test_swap_in_place_matches_each_row_alone(tiny_model_dir):
    engine = HFModel(str(tiny_model_dir))
    batch, logits, rows = Batch(engine.model, engine.config), {}, [Row(i) for i in range(len(PROMPTS))]
    for rid in range(3):
        kv, logits[rid] = _own_kv(engine, rid)
        batch.add(rows[rid], kv)
    _greedy_steps(batch, logits, 3)  # rows 0-2, left-padded to the longest (row 1)
    assert (batch.repacks, batch.swaps) == (1, 0)
    batch.remove(rows[1])  # the longest row leaves, a shorter one joins: a swap
    kv, logits[3] = _own_kv(engine, 3)
    batch.add(rows[3], kv)
    assert [s.rid for s in batch.seqs] == [0, 3, 2]  # the newcomer takes the leaver's row
    _greedy_steps(batch, logits, 4)
    assert (batch.repacks, batch.swaps) == (1, 1)
    for rid, steps in ((0, 7), (2, 7), (3, 4)):
        alone = _alone(engine, rid, steps)
        assert int(alone.argmax()) == int(logits[rid].argmax()), rid
        assert (alone - logits[rid]).abs().max() < 1e-4, (rid, float((alone - logits[rid]).abs().max()))
    batch.remove(rows[0])  # a leave with no join: the batch is re-packed
    _greedy_steps(batch, logits, 1)
    assert (batch.repacks, batch.swaps) == (2, 1)
    assert [s.rid for s in batch.seqs] == [3, 2]


@torch.inference_mode()
def test_no_swap_that_would_keep_the_batch_padded_wide(tiny_model_dir):
    """A long row replaced by a short one: re-packed, so the padding shrinks to the longest row left."""
    engine = HFModel(str(tiny_model_dir))
    batch, logits, rows = Batch(engine.model, engine.config), {}, [Row(i) for i in range(3)]
    long_prompt = engine.render([{"role": "user", "content": "Describe a cat. " * 40}])
    cache, logits[0] = engine.prefill(long_prompt)
    batch.add(rows[0], [(k.clone(), v.clone()) for k, v in cache_layers(cache)])
    kv, logits[1] = _own_kv(engine, 0)
    batch.add(rows[1], kv)
    _greedy_steps(batch, logits, 1)
    assert batch.width == len(long_prompt) + 1
    batch.remove(rows[0], keep_kv=False)
    kv, logits[2] = _own_kv(engine, 2)
    batch.add(rows[2], kv)
    _greedy_steps(batch, logits, 1)
    assert (batch.repacks, batch.swaps) == (2, 0)
    assert batch.width < len(long_prompt) // 2
    # The last row leaving resets the batch: the next one starts at its own width.
    for s in list(batch.seqs):
        batch.remove(s, keep_kv=False)
    assert batch.cache is None and len(batch) == 0
