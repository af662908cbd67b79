"""The CUDA paths: pinned host swap and device-resident snapshots.  Skipped without a GPU."""

import pytest
import torch

from contexts import pressure
from contexts.manager import ContextManager
from contexts.snapshot import Snapshot

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda_snapshot(n: int) -> Snapshot:
    g = torch.Generator(device="cuda").manual_seed(0)
    kv = [(torch.randn(1, 2, n, 8, device="cuda", generator=g), torch.randn(1, 2, n, 8, device="cuda", generator=g))]
    return Snapshot(layers=kv, logits=torch.randn(1, 16, device="cuda", generator=g), meta=None)


@cuda
def test_device_tier_stays_on_the_gpu_in_place():
    cm = ContextManager("cuda", device_budget=1 << 30, host_budget=1 << 30)
    snap = cuda_snapshot(32)
    ptr = snap.layers[0][0].data_ptr()
    cm.snapshot(1, snap)
    back = cm.restore(1)
    assert back.layers[0][0].is_cuda and back.layers[0][0].data_ptr() == ptr


@cuda
def test_host_tier_is_pinned_and_exact():
    cm = ContextManager("cuda", device_budget=0, host_budget=1 << 30)
    snap = cuda_snapshot(64)
    original = [t.clone() for t in snap.tensors()]
    cm.snapshot(1, snap)
    held = cm._snaps[1]
    assert held.tier == "host" and all(t.device.type == "cpu" and t.is_pinned() for t in held.tensors())
    back = cm.restore(1)
    assert all(t.is_cuda for t in back.tensors())
    assert all(torch.equal(a, b) for a, b in zip(original, back.tensors(), strict=True))


@cuda
def test_device_pressure_reads_free_gpu_memory():
    free = pressure.device_free(torch.device("cuda"))
    assert free is not None and free <= torch.cuda.mem_get_info()[0]


def test_cpu_device_has_no_gpu_pressure():
    assert pressure.device_free(torch.device("cpu")) is None
