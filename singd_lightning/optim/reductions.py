"""The reductions a step runs over all of its tensors: whether they are finite,
and inner products, each by the route its device runs fastest.

On a GPU every small operation is a kernel launch, so the checks there use
multi-tensor kernels and a batch's inner products one batched product
(:data:`LAUNCH_BOUND_DEVICES`); on the CPU, where those run slower than a pass
per tensor, the per-tensor routes. Each returns tensors, never host values,
except :func:`finite_and_count` and :func:`non_finite`, which read one value per
device.
"""

from __future__ import annotations

import torch
from torch import Tensor


def all_finite(t: Tensor) -> Tensor:
    """Whether ``t`` holds no inf or NaN, as a 0-dim bool tensor (no host sync):
    its extremes are finite (one pass, no temporary of ``t``'s size)."""
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    return torch.isfinite(torch.stack(torch.aminmax(t))).all()


#: Device types where a step's many small operations cost their launches more than
#: their work: there the step's finiteness check uses multi-tensor kernels
#: (:func:`all_finite_multi_tensor`) and a batch's inner products one batched product
#: (:func:`inner_rows`); elsewhere (the CPU) the faster per-tensor routes.
LAUNCH_BOUND_DEVICES = frozenset({"cuda"})


def launch_bound(device: torch.device) -> bool:
    """Whether ``device`` is one of :data:`LAUNCH_BOUND_DEVICES` (read at each call)."""
    return device.type in LAUNCH_BOUND_DEVICES


def all_finite_multi_tensor(tensors: list[Tensor]) -> Tensor:
    """Whether all ``tensors`` are finite, as one 0-dim bool tensor, from their
    infinity norms (``max |x|``: NaN if any entry is NaN, inf if any is ±inf; it
    cannot overflow) taken by multi-tensor kernels, one set per dtype: a few
    kernel launches for all tensors where :func:`all_finite` takes four per
    tensor. For CUDA; on the CPU the infinity norm is several times slower than
    ``aminmax``."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        if t.numel():  # (the infinity norm of nothing is undefined; nothing is finite)
            by_dtype.setdefault(t.dtype, []).append(t)
    if not by_dtype:
        return torch.ones((), dtype=torch.bool, device=tensors[0].device if tensors else None)
    checks = [torch.stack(torch._foreach_norm(group, float("inf"))).isfinite().all() for group in by_dtype.values()]
    return checks[0] if len(checks) == 1 else torch.stack(checks).all()


def finite_per_entry(entries: list[list[Tensor]]) -> Tensor:
    """Whether all tensors of each entry are finite: a bool tensor, one value per
    entry. On :data:`LAUNCH_BOUND_DEVICES` from the multi-tensor infinity norms
    of all tensors at once, summed per entry (a few kernels for any number of
    entries); elsewhere four operations per tensor (:func:`all_finite`)."""
    device = entries[0][0].device
    if not launch_bound(device):
        return torch.stack([torch.stack([all_finite(t) for t in entry]).all() for entry in entries])
    flat = [t for entry in entries for t in entry]
    norms: list[Tensor | None] = [None] * len(flat)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(flat):
        if t.numel():  # (nothing is finite)
            by_dtype.setdefault(t.dtype, []).append(i)
    for dtype, indices in by_dtype.items():
        results = torch._foreach_norm([flat[i] for i in indices], float("inf"),
                                      dtype=torch.promote_types(dtype, torch.float32))
        for i, norm in zip(indices, results):
            norms[i] = norm
    # A rectangle (entries × their most tensors), padded with zeros: no index
    # tensor to copy to the device.
    zero = torch.zeros((), dtype=torch.float32, device=device)
    width, grid, offset = max(len(entry) for entry in entries), [], 0
    for entry in entries:
        row = [norm if norm is not None else zero for norm in norms[offset:offset + len(entry)]]
        grid += row + [zero] * (width - len(entry))
        offset += len(entry)
    # 0 · norm: 0 where finite, NaN where not; any NaN makes its entry's sum NaN.
    return torch.isfinite(torch.stack(grid).view(len(entries), width).mul(0.0).sum(dim=1))


def inner(a: Tensor, b: Tensor) -> Tensor:
    """``Σ a ⊙ b`` in at least float32, 0-dim: on the CPU one BLAS dot product
    without a temporary when both are contiguous float32 tensors (a
    preconditioned gradient and its gradient), else through the elementwise
    product."""
    if a.dtype == b.dtype == torch.float32 and a.is_contiguous() and b.is_contiguous() and a.device.type == "cpu":
        return torch.dot(a.view(-1), b.view(-1))
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return (a.to(dtype) * b.to(dtype)).sum()


def inner_rows(a: Tensor, b: Tensor) -> Tensor:
    """``Σ a[l] ⊙ b[l]`` for each ``l`` of the first dimension, ``(L,)``, in at least
    float32, without a temporary of ``a``'s size: one batched product on a GPU
    (:data:`LAUNCH_BOUND_DEVICES`); on the CPU, where that product runs several
    times slower than BLAS dot products, one :func:`inner` per ``l``."""
    if launch_bound(a.device):
        return batched_inner(a, b)
    return torch.stack([inner(x, y) for x, y in zip(a, b)])


def batched_inner(a: Tensor, b: Tensor) -> Tensor:
    """:func:`inner_rows` as one batched product ``(L, 1, n) @ (L, n, 1)``."""
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    a, b = a.to(dtype).flatten(1), b.to(dtype).flatten(1)
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def non_finite(tensors: list[Tensor]) -> bool:
    """Whether any tensor holds an inf or NaN (one synchronisation per device)."""
    return not finite_and_count(tensors, [])[0]


def finite_and_count(tensors: list[Tensor], flags: list[Tensor]) -> tuple[bool, int]:
    """Whether every tensor is finite, and how many of the 0-dim bool ``flags``
    are set: one device-to-host copy per device for both. On
    :data:`LAUNCH_BOUND_DEVICES` the tensors are checked by multi-tensor kernels
    (:func:`all_finite_multi_tensor`)."""
    by_device: dict[torch.device, tuple[list[Tensor], list[Tensor]]] = {}
    multi_tensor: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        if launch_bound(t.device):
            multi_tensor.setdefault(t.device, []).append(t)
        else:
            by_device.setdefault(t.device, ([], []))[0].append(all_finite(t))
    for device, group in multi_tensor.items():
        by_device.setdefault(device, ([], []))[0].append(all_finite_multi_tensor(group))
    for f in flags:  # (0-dim, or one per layer of a batch)
        by_device.setdefault(f.device, ([], []))[1].append(f.reshape(-1).to(torch.int64))
    finite, count = True, 0
    for checks, counts in by_device.values():
        ok = torch.stack(checks).all().to(torch.int64) if checks else torch.ones((), dtype=torch.int64)
        total = torch.cat(counts).sum() if counts else torch.zeros((), dtype=torch.int64)
        ok_host, total_host = torch.stack([ok.to(total.device), total]).tolist()
        finite = finite and bool(ok_host)
        count += int(total_host)
    return finite, count
