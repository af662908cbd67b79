"""Context tiers with real tensors and real files: disk format, budgets, corruption, cost model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from contexts import disk
from contexts.cost import CostModel
from contexts.kv import build_cache, cache_layers
from contexts.manager import ContextManager
from contexts.snapshot import Snapshot


def slow_prefill() -> CostModel:
    """Recomputing 16 tokens: 16 s; swapping them: microseconds.  So the disk tier is chosen."""
    return CostModel(prefill_tps=1.0)


def snap(n: int, seed: int, dtype: torch.dtype = torch.float32) -> Snapshot:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    kv = [(rand(1, 2, n, 8), rand(1, 2, n, 8)) for _ in range(3)]
    return Snapshot(layers=kv, logits=rand(1, 50), meta={"seed": seed})


def same(a: Snapshot, b: Snapshot) -> bool:
    pairs = [(x, y) for kv_a, kv_b in zip(a.layers, b.layers, strict=True) for x, y in zip(kv_a, kv_b, strict=True)]
    return all(x.dtype == y.dtype and torch.equal(x, y) for x, y in pairs) and torch.equal(a.logits, b.logits)


def files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file())


def dir_bytes(d: Path) -> int:
    return sum(os.stat(p).st_size for p in files(d))


def disk_manager(tmp_path: Path, disk_budget: int = 1 << 30) -> ContextManager:
    """Everything spills to disk at once: no device or host budget."""
    return ContextManager("cpu", 0, 0, disk_budget=disk_budget, state_dir=str(tmp_path), cost=slow_prefill())


def test_tokens_from_shape():
    assert snap(16, 0).tokens == 16
    assert Snapshot(layers=None, logits=None, meta=None).tokens == 0
    assert Snapshot(layers=snap(16, 0).layers, logits=None, meta=None, tokens=5).tokens == 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tier", ["device", "host", "disk", "recompute"])
def test_round_trip_through_each_tier_is_bit_exact(tmp_path, tier, dtype):
    cm = ContextManager("cpu", 1 << 30, 1 << 30, state_dir=str(tmp_path))
    cm.snapshot(1, snap(16, 1, dtype))
    if tier != "device":
        moves = cm.demote(1, tier)
        assert [(m.key, m.tier) for m in moves] == [(1, tier)]
    assert cm.tier_of(1) == tier
    assert len(files(tmp_path)) == (tier == "disk")
    back = cm.restore(1)
    assert back.meta == {"seed": 1} and back.tokens == 16
    if tier == "recompute":
        assert back.layers is None and back.logits is None
    else:
        assert same(back, snap(16, 1, dtype))
    assert files(tmp_path) == [] and 1 not in cm
    assert cm.stats()["corrupt_fallbacks"] == 0


def test_disk_file_is_checksummed_safetensors(tmp_path):
    from safetensors import safe_open

    cm = disk_manager(tmp_path)
    cm.snapshot(42, snap(16, 0))
    [path] = files(tmp_path)
    assert path.name == "ctx-42.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert sorted(f.keys()) == sorted(["logits"] + [f"{kv}.{i}" for i in range(3) for kv in "kv"])
    assert meta["layers"] == "3" and meta["version"] == disk.VERSION and len(meta["checksum"]) == 32
    assert cm.stats()["tiers"]["disk"] == {"count": 1, "bytes": os.stat(path).st_size}


def test_budgets_hold_after_many_snapshots(tmp_path):
    one = snap(16, 0).nbytes
    budget = 4 * one + 500  # four files, each a little larger than its tensors
    cm = ContextManager("cpu", 2 * one, 3 * one, disk_budget=budget, state_dir=str(tmp_path), cost=slow_prefill())
    for key in range(40):
        cm.snapshot(key, snap(16, key))
        st = cm.stats()
        assert cm.used("device") <= 2 * one and cm.used("host") <= 3 * one
        assert dir_bytes(tmp_path) <= cm.disk_budget
        assert st["tiers"]["disk"]["bytes"] == dir_bytes(tmp_path)
        assert st["tiers"]["disk"]["count"] == len(files(tmp_path))
    tiers = {cm.tier_of(k) for k in range(40)}
    assert tiers == {"device", "host", "disk", "recompute"}
    assert cm.tier_of(39) == "device" and cm.tier_of(0) == "recompute"  # least recently used go lowest
    for key in range(40):  # whatever the tier, a restore is exact or an honest recompute
        back = cm.restore(key)
        assert back.layers is None or same(back, snap(16, key))
    assert files(tmp_path) == []


def test_disk_budget_too_small_for_one_file(tmp_path):
    cm = disk_manager(tmp_path, disk_budget=100)
    assert [(m.key, m.tier) for m in cm.snapshot(1, snap(16, 1))] == [(1, "host"), (1, "recompute")]
    assert files(tmp_path) == []
    cm = ContextManager("cpu", 1 << 30, 0, disk_budget=100, state_dir=str(tmp_path))
    cm.snapshot(2, snap(16, 2))
    with pytest.raises(ValueError):  # forcing is explicit: no silent recompute
        cm.demote(2, "disk")
    assert cm.tier_of(2) == "device" and files(tmp_path) == []


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_data(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01  # one bit of the tensor bytes: the file still parses
    path.write_bytes(bytes(data))


def flip_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    at = data.index(b'"checksum":"') + len(b'"checksum":"')
    data[at] = ord("0") if data[at] != ord("0") else ord("1")
    path.write_bytes(bytes(data))


def same_size_other_file(path: Path) -> None:
    """A well-formed file of the right size with other values (e.g. another run's snapshot)."""
    other = path.with_name("other")
    cm = ContextManager("cpu", 0, 0, state_dir=str(other), cost=slow_prefill())
    cm.snapshot(1, snap(16, 99))
    os.replace(other / "ctx-1.safetensors", path)
    shutil.rmtree(other)


@pytest.mark.parametrize("damage", [truncate, flip_data, flip_header, same_size_other_file, os.unlink])
def test_damaged_file_falls_back_to_recompute(tmp_path, damage, caplog):
    cm = disk_manager(tmp_path)
    cm.snapshot(1, snap(16, 1))
    cm.snapshot(2, snap(16, 2))
    damage(tmp_path / "ctx-1.safetensors")
    back = cm.restore(1)
    assert back.layers is None and back.logits is None and back.tier == "recompute"
    assert back.meta == {"seed": 1}  # what the backend needs to re-prefill
    assert cm.stats()["corrupt_fallbacks"] == 1
    assert "unusable" in caplog.text
    assert [p.name for p in files(tmp_path)] == ["ctx-2.safetensors"]
    assert same(cm.restore(2), snap(16, 2))  # the other snapshot is untouched


def test_failed_write_leaves_no_file_and_recomputes(tmp_path, monkeypatch):
    cm = disk_manager(tmp_path)

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    cm.snapshot(1, snap(16, 1))
    assert cm.tier_of(1) == "recompute" and files(tmp_path) == []  # the temp file is gone too
    assert cm.stats()["disk_errors"] == 1


def test_discard_and_restore_delete_files(tmp_path):
    cm = disk_manager(tmp_path)
    for key in (1, 2, 3):
        cm.snapshot(key, snap(8, key))
    assert len(files(tmp_path)) == 3
    cm.discard(1)
    cm.restore(2)
    assert [p.name for p in files(tmp_path)] == ["ctx-3.safetensors"]
    cm.snapshot(3, snap(8, 4))  # a new snapshot under a key replaces the old file
    assert [p.name for p in files(tmp_path)] == ["ctx-3.safetensors"]
    assert same(cm.restore(3), snap(8, 4))
    cm.discard(99)  # unknown keys are fine
    assert files(tmp_path) == []


def test_stale_files_are_removed_on_start(tmp_path):
    for name in ("ctx-1.safetensors", "ctx-77.safetensors", "ctx-5.safetensors.tmp"):
        (tmp_path / name).write_bytes(b"left by a crashed worker")
    (tmp_path / "notes.txt").write_text("not ours")
    ContextManager("cpu", 0, 0, state_dir=str(tmp_path))
    assert [p.name for p in files(tmp_path)] == ["notes.txt"]


def test_files_a_dead_worker_left_are_adopted_by_the_next_one(tmp_path):
    old = disk_manager(tmp_path)
    for key in (1, 2, 3):
        s = snap(8, key)
        s.ident = f"ids-{key}"
        old.snapshot(key, s)
    assert len(files(tmp_path)) == 3
    (tmp_path / "ctx-3.safetensors").write_bytes((tmp_path / "ctx-3.safetensors").read_bytes()[:-4] + b"oops")
    (tmp_path / "ctx--4.safetensors").write_bytes((tmp_path / "ctx-1.safetensors").read_bytes())  # a session's
    new = disk_manager(tmp_path)  # the old one "died": nothing but its files is left
    assert new.orphans == {1: "ids-1", 2: "ids-2", 3: "ids-3"} and new.stats()["orphans"] == 3
    assert not (tmp_path / "ctx--4.safetensors").exists()
    assert same(new.restore(1), snap(8, 1)) and 1 not in new.orphans
    damaged = new.restore(3)  # its bytes no longer match its own checksum: recomputed, never used
    assert damaged.layers is None and new.stats()["corrupt_fallbacks"] == 1
    new.discard(2)  # nobody claimed it
    assert files(tmp_path) == [] and new.orphans == {}


def test_orphans_beyond_the_disk_budget_are_removed(tmp_path):
    old = disk_manager(tmp_path)
    for key in (1, 2):
        old.snapshot(key, snap(8, key))
    one = os.stat(tmp_path / "ctx-1.safetensors").st_size
    new = disk_manager(tmp_path, disk_budget=one + 1)
    assert sorted(new.orphans) == [1] and [p.name for p in files(tmp_path)] == ["ctx-1.safetensors"]


def test_state_dir_is_created(tmp_path):
    cm = disk_manager(tmp_path / "a" / "b")
    cm.snapshot(1, snap(8, 1))
    assert (tmp_path / "a" / "b" / "ctx-1.safetensors").exists()


def test_no_state_dir_means_no_disk_tier():
    cm = ContextManager("cpu", 0, 0, cost=slow_prefill())
    assert [(m.key, m.tier) for m in cm.snapshot(1, snap(16, 1))] == [(1, "host"), (1, "recompute")]
    st = cm.stats()
    assert st["disk_budget"] == 0 and st["decisions"] == {"disk": 0, "recompute": 0}
    cm.snapshot(2, snap(16, 2))
    with pytest.raises(ValueError):
        cm.demote(2, "disk")


def test_cost_model_picks_recompute_when_prefill_is_fast_and_disk_when_slow(tmp_path):
    cm = ContextManager("cpu", 0, 0, state_dir=str(tmp_path))
    cm.observe_prefill(tokens=1_000_000, seconds=0.001)  # 1e9 tokens/s: recomputing is free
    cm.snapshot(1, snap(16, 1))
    assert cm.tier_of(1) == "recompute"
    cm.cost.prefill_tps = 0.001  # recomputing 16 tokens: hours
    cm.snapshot(2, snap(16, 2))
    assert cm.tier_of(2) == "disk"
    st = cm.stats()
    assert st["decisions"] == {"disk": 1, "recompute": 1}
    assert st["cost_model"]["prefill_tps"] == 0.001
    assert st["cost_model"]["write_Bps"] != CostModel().write_Bps  # measured on the real write
    cm.restore(2)
    assert cm.stats()["cost_model"]["read_Bps"] != CostModel().read_Bps


def test_cost_model_estimates_follow_measurements():
    c = CostModel(alpha=0.5)
    c.observe_prefill(100, 1.0)
    assert c.prefill_tps == 100.0  # the first measurement replaces the guess
    c.observe_prefill(300, 1.0)
    assert c.prefill_tps == 200.0  # later ones are averaged
    c.observe_prefill(0, 1.0)
    c.observe_prefill(10, 0.0)
    assert c.prefill_tps == 200.0  # nothing measured, nothing changed
    assert c.recompute_s(400) == 2.0
    assert c.swap_s(int(3e9)) == pytest.approx(3e9 / 1e9 + 3e9 / 2e9)
    assert c.prefer_disk(nbytes=1000, tokens=400) and not c.prefer_disk(nbytes=int(1e12), tokens=400)


def test_demote_step_by_step(tmp_path):
    cm = ContextManager("cpu", 1 << 30, 1 << 30, state_dir=str(tmp_path))
    cm.snapshot(1, snap(16, 1))
    one = snap(16, 1).nbytes
    assert cm.demote(1, "host")[0].tier == "host" and cm.used("host") == one
    with pytest.raises(ValueError):
        cm.demote(1, "device")
    with pytest.raises(ValueError):
        cm.demote(1, "host")
    [m] = cm.demote(1, "disk")
    assert (m.tier, m.nbytes) == ("disk", dir_bytes(tmp_path)) and cm.used("host") == 0
    assert [(m.key, m.tier, m.nbytes) for m in cm.demote(1, "recompute")] == [(1, "recompute", 0)]
    assert files(tmp_path) == []
    with pytest.raises(ValueError):
        cm.demote(1, "nowhere")
    assert cm.stats()["moves"] == 3


def test_demote_to_disk_makes_room_by_dropping_the_oldest(tmp_path):
    cm = ContextManager("cpu", 1 << 30, 1 << 30, state_dir=str(tmp_path))
    cm.snapshot(1, snap(16, 1))
    cm.demote(1, "disk")
    one_file = dir_bytes(tmp_path)
    cm.disk_budget = one_file  # room for one file only
    cm.snapshot(2, snap(16, 2))
    moves = cm.demote(2, "disk")
    assert [(m.key, m.tier) for m in moves] == [(1, "recompute"), (2, "disk")]
    assert [p.name for p in files(tmp_path)] == ["ctx-2.safetensors"]


def test_real_dynamic_cache_resumes_bit_exact_from_disk(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 1000, (1, 20), generator=torch.Generator().manual_seed(1))

    @torch.inference_mode()
    def forward(x: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        return model(input_ids=x, cache=cache, use_cache=True).logits[:, -1, :]

    def step(logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1, keepdim=True)

    # Uninterrupted: prefill, then two decode steps.
    cache = DynamicCache(config=cfg)
    ref0 = forward(ids, cache)
    ref1 = forward(step(ref0), cache)
    ref2 = forward(step(ref1), cache)

    # Interrupted after the prefill: snapshot -> disk -> restore, then the same two steps.
    cache = DynamicCache(config=cfg)
    logits = forward(ids, cache)
    cm = ContextManager("cpu", 1 << 30, 1 << 30, state_dir=str(tmp_path))
    cm.snapshot(7, Snapshot(layers=cache_layers(cache), logits=logits, meta=None))
    del cache, logits
    cm.demote(7, "disk")
    assert cm.tier_of(7) == "disk" and len(files(tmp_path)) == 1
    back = cm.restore(7)
    assert back.tokens == 20 and torch.equal(back.logits, ref0)
    cache = build_cache(back.layers, cfg)
    out1 = forward(step(back.logits), cache)
    out2 = forward(step(out1), cache)
    assert torch.equal(out1, ref1) and torch.equal(out2, ref2)


def test_resumed_file_leaves_at_once_and_its_space_is_freed_in_the_background(tmp_path):
    cm = disk_manager(tmp_path)
    cm.snapshot(1, snap(8, 1))
    assert same(cm.restore(1), snap(8, 1))
    assert files(tmp_path) == []  # gone from where snapshots live when restore returns
    cm.reaper.drain()
    assert list((tmp_path / ".trash").iterdir()) == []  # and unlinked by the reaper


def test_trash_left_by_a_dead_process_is_removed_on_start(tmp_path):
    (tmp_path / ".trash").mkdir()
    (tmp_path / ".trash" / "4242-0.del").write_bytes(b"x" * 100)
    disk_manager(tmp_path)
    assert list((tmp_path / ".trash").iterdir()) == []
