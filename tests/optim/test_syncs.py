"""Host-device synchronisations per optimizer step: a small constant, independent
of the number of layers (on a GPU every ``.item()``, ``.tolist()`` or
``bool(tensor)`` of a device tensor stalls the host until the queue drains).

On CPU a counting shim patches the methods that read a tensor's value on the
host; on CUDA, ``torch.cuda.set_sync_debug_mode`` counts the real ones.
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter

import pytest
import torch
from torch import nn

from singd_lightning import KFAC, SINGD

#: Tensor methods that copy a value to the host (a sync if the tensor is on a GPU).
READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")


class SyncCounter:
    """Counts host reads of tensor values, by caller, except of ``host`` tensors
    (counters kept on the host by design, as ``torch.optim`` keeps ``step``)."""

    def __init__(self, host: set[int]) -> None:
        self.host = host
        self.calls: Counter[tuple[str, str, int]] = Counter()
        self._saved: dict[str, object] = {}

    def __enter__(self) -> SyncCounter:
        for name in READS:
            original = self._saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._counting(name, original))
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)

    def _counting(self, name: str, original):
        counter = self

        def read(tensor, *args, **kwargs):
            if id(tensor) not in counter.host:
                caller = sys._getframe(1).f_code
                counter.calls[(name, caller.co_filename.rsplit("/", 1)[-1], caller.co_name)] += 1
            return original(tensor, *args, **kwargs)

        return read

    @property
    def total(self) -> int:
        return sum(self.calls.values())


def _model(hidden: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(3, 6, 3, padding=1), nn.ReLU()]
    for _ in range(hidden):
        layers += [nn.Conv2d(6, 6, 3, padding=1), nn.ReLU()]
    layers += [nn.Flatten(), nn.Linear(6 * 6 * 6, 5), nn.ReLU(), nn.Linear(5, 5)]
    return nn.Sequential(*layers)


def _host_counters(optimizer) -> set[int]:
    host = {id(st["step"]) for st in optimizer.state.values() if "step" in st}
    return host | {id(st["updates"]) for st in optimizer.layer_state.values() if "updates" in st}


def _syncs_per_step(make, hidden: int, steps: int, device: str = "cpu") -> list[int]:
    """Host reads of device values in each of ``steps`` steps (after one untimed)."""
    torch.manual_seed(0)
    model = _model(hidden).to(device)
    optimizer = make(model)
    x, y = torch.randn(4, 3, 6, 6, device=device), torch.randint(0, 5, (4,), device=device)
    counts = []
    for step in range(steps + 1):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if step == 0:
            optimizer.step()
            continue
        with SyncCounter(_host_counters(optimizer)) as counter:
            optimizer.step()
        counts.append(counter.total)
    return counts


SINGD_CASES = [  # (structure, options, T)
    ("diagonal", {}, 3),
    ("block_diagonal", {"block_size": 4}, 1),
    ("hierarchical", {"k1": 2, "k2": 2}, 1),
    ("hierarchical", {"k1": 2, "k2": 2}, 3),
    ("tril_toeplitz", {}, 3),
    ("dense", {}, 1),
]


@pytest.mark.parametrize("batch_layers", [False, True])  # (the hidden convolutions: one batch)
@pytest.mark.parametrize("name,options,T", SINGD_CASES, ids=[f"{c[0]}-T{c[2]}" for c in SINGD_CASES])
def test_singd_syncs_per_step_do_not_grow_with_layers(name, options, T, batch_layers):
    def make(model):
        spec = {"name": name, **options}
        return SINGD(model, lr=1e-2, T=T, structures=(spec, spec), update_clip=10.0, batch_layers=batch_layers)

    steps = 3 if T == 3 else 2
    shallow, deep = _syncs_per_step(make, 1, steps), _syncs_per_step(make, 4, steps)
    assert shallow == deep
    # A factor-update step: statistics checked, factor steps bounded, new factors
    # and all updates checked (one read each); any other step: the update check.
    # The first step (not counted) updated the factors, so at T = 3 the third does.
    expected_plain = [1, 1] if T == 3 else []
    assert shallow[:len(expected_plain)] == expected_plain
    assert all(0 < n <= 4 for n in shallow[len(expected_plain):])


def test_warm_start_syncs_per_step_do_not_grow_with_layers():
    def make(model):
        return SINGD(model, lr=1e-2, T=1, structures="dense", factor_init="warm", kl_clip=1e-3)

    # The warm start's factors on this tiny batch: one more read than above where
    # the factor step's cheap bound cannot clear it and its power-iteration
    # estimate runs (one read for all layers, so a deeper model may need it where
    # a shallow one does not, but never more).
    for counts in (_syncs_per_step(make, 1, 3), _syncs_per_step(make, 4, 3)):
        assert all(0 < n <= 5 for n in counts), counts


def test_kfac_syncs_per_step_do_not_grow_with_layers():
    def make(model):
        return KFAC(model, lr=1e-2, T=1)

    shallow, deep = _syncs_per_step(make, 1, 2), _syncs_per_step(make, 4, 2)
    assert shallow == deep and max(shallow) <= 4


def test_counter_sees_host_reads():
    t = torch.ones(3)
    with SyncCounter(set()) as counter:
        t.sum().item()
        t.tolist()
        bool(t[0])
    assert counter.total == 3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("optimizer", ["singd", "kfac"])
def test_cuda_syncs_per_step_do_not_grow_with_layers(optimizer):
    """The device's own count (``set_sync_debug_mode``) of a step's syncs."""

    def make(model):
        if optimizer == "kfac":
            return KFAC(model, lr=1e-2, T=1)
        return SINGD(model, lr=1e-2, T=1, structures="hierarchical")

    def count(hidden: int) -> int:
        torch.manual_seed(0)
        model = _model(hidden).cuda()
        opt = make(model)
        x, y = torch.randn(4, 3, 6, 6, device="cuda"), torch.randint(0, 5, (4,), device="cuda")
        for _ in range(2):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            torch.cuda.synchronize()
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    opt.step()
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        return sum("synchronizing" in str(w.message) for w in caught)

    # The shim's reads plus the host-to-device copies the device counts too (a
    # list of bounds), still a constant.
    shallow, deep = count(1), count(5)
    assert shallow == deep and shallow <= 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), float("-inf")])
def test_multi_tensor_finiteness_check_agrees_with_the_per_tensor_one(monkeypatch, dtype, bad):
    from singd_lightning.optim import reductions

    tensors = [torch.randn(5, 3), torch.empty(0), torch.full((4,), 6e4, dtype=torch.float16), torch.randn(7).to(dtype)]
    if bad is not None:
        tensors[-1][3] = bad
    flags = [torch.tensor(True), torch.tensor([True, False, True])]
    per_tensor = reductions.finite_and_count(tensors, flags)
    monkeypatch.setattr(reductions, "LAUNCH_BOUND_DEVICES", frozenset({"cuda", "cpu"}))
    assert reductions.finite_and_count(tensors, flags) == per_tensor == (bad is None, 3)
    assert bool(reductions.all_finite_multi_tensor([torch.empty(0)])) and bool(reductions.all_finite_multi_tensor([]))


@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), float("-inf")])
def test_multi_tensor_check_per_entry_agrees_with_the_per_tensor_one(monkeypatch, bad):
    from singd_lightning.optim import reductions

    entries = [[torch.randn(4), torch.randn(2, 3).bfloat16()], [torch.empty(0), torch.ones(())],
               [torch.full((3,), 6e4, dtype=torch.float16)], [torch.randn(5), torch.randn(5).double(), torch.randn(1)]]
    if bad is not None:
        entries[1][1] = torch.tensor(bad)
        entries[3][1][2] = bad
    per_tensor = reductions.finite_per_entry(entries)
    monkeypatch.setattr(reductions, "LAUNCH_BOUND_DEVICES", frozenset({"cuda", "cpu"}))
    multi_tensor = reductions.finite_per_entry(entries)
    expected = [True, bad is None, True, bad is None]
    assert per_tensor.tolist() == multi_tensor.tolist() == expected
