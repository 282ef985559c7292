"""Dense KFAC with explicit damped inverses: the baseline SINGD is compared to.

Two variants are named options: today's (``damping_mode="split"``, a separate
``stat_decay``, factors starting from the first statistics) and the authors' KFAC
baseline of the SINGD paper (``damping_mode="per_factor"``, ``stat_decay=None``,
``factor_init="identity"``), as in the KFAC code the paper pinned
(yorkerlin/KFAC-Pytorch, ``optimizers/kfac.py``: ``_inv_covs`` adds λ to each
factor, ``_save_input`` starts the factors at I, ``update_running_stat`` is the
EMA) and the wrapper that ties its EMA to the factor learning rate
(f-dangel/singd before b5db71a, ``sparse_ngd/experimental/kfac_helpers.py``:
``stat_decay = 1.0 - lr_cov``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from singd_lightning.optim.base import KroneckerOptimizer
from singd_lightning.optim.curvature import KroneckerLayer, Rows
from singd_lightning.optim.hyperparameters import check_choice, check_range, resolve_lr_cov

#: ``"split"``: ``(A + √λ I)⁻¹ ⊗ (G + √λ I)⁻¹``; ``"per_factor"``: ``(A + λI)⁻¹ ⊗ (G + λI)⁻¹``.
DAMPING_MODES = ("split", "per_factor")
#: ``"statistics"``: the first statistics are the factors; ``"identity"``: the
#: factors start at I and the first statistics enter the EMA like all others.
FACTOR_INITS = ("statistics", "identity")


class KFAC(KroneckerOptimizer):
    """KFAC: EMAs of ``AᵀA`` and ``GᵀG``, inverted every ``T`` steps.

    The update is ``D = (GᵀG + δ I)⁻¹ Ĝ (AᵀA + δ I)⁻¹`` with ``δ = √λ``
    (``damping_mode="split"``) or ``δ = λ`` (``"per_factor"``), followed by the same
    weight decay and momentum as :class:`~singd_lightning.SINGD`. The inverses are
    computed in float32 (``torch.linalg`` has no half-precision inverse) and stored
    in the preconditioner dtype, which is where low-precision KFAC loses accuracy.
    A factor whose inverse is not finite keeps its previous inverse.

    Args:
        model: The model; DataParallel/DistributedDataParallel wrappers are unwrapped.
        params: None, parameters, or parameter groups.
        lr: Learning rate.
        momentum: Momentum on the updates, in [0, 1).
        damping: λ; each factor is damped by √λ or λ (``damping_mode``).
        weight_decay: L2 weight decay added to the preconditioned gradient.
        T: Collect statistics and refresh the inverses every ``T`` steps.
        stat_decay: EMA factor of the Kronecker factors, in [0, 1); None: the
            authors' tie ``1 − lr_cov`` at each factor update.
        lr_cov: β₁, used only when ``stat_decay`` is None: a number in [0, 1] or a
            callable ``step -> number`` (a schedule such as the β₁ warm-up).
        damping_mode: ``"split"`` (√λ added to each factor, so that the damping of
            the Kronecker product is about λ) or ``"per_factor"`` (λ added to each
            factor, the authors' KFAC).
        factor_init: ``"statistics"`` (the first statistics are the factors) or
            ``"identity"`` (the factors start at I and every statistic, the first
            included, enters the EMA: the authors' KFAC).
        kfac_approx: ``"expand"`` or ``"reduce"``.
        loss_average: ``"batch"``, ``"batch+sequence"`` or None.
        preconditioner_dtype: ``(A's, G's)`` dtype; None means the weight's dtype.
        **kwargs: Fallback and loss-scaler options.
    """

    # The statistics (dense Gram matrices) need no state; preconditioning needs the inverses.
    precondition_keys = ("A_inv", "G_inv")

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[nn.Parameter] | Iterable[dict] | None = None,
        lr: float = 1e-3,
        momentum: float = 0.9,
        damping: float = 1e-3,
        weight_decay: float = 0.0,
        T: int = 10,
        stat_decay: float | None = 0.95,
        lr_cov: float | Callable[[int], float] = 1e-2,
        damping_mode: str = "split",
        factor_init: str = "statistics",
        kfac_approx: str = "expand",
        loss_average: str | None = "batch",
        preconditioner_dtype: tuple = (None, None),
        **kwargs,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            damping=damping,
            weight_decay=weight_decay,
            T=T,
            stat_decay=stat_decay,
            lr_cov=lr_cov,
            damping_mode=damping_mode,
            factor_init=factor_init,
            kfac_approx=kfac_approx,
            loss_average=loss_average,
            preconditioner_dtype=preconditioner_dtype,
        )
        super().__init__(model, params, defaults, **kwargs)

    def _validate_group(self, group: dict) -> None:
        if group["stat_decay"] is not None:
            check_range("stat_decay", group["stat_decay"], 0.0, 1.0)
        if not callable(group["lr_cov"]):
            check_range("lr_cov", group["lr_cov"], 0.0, 1.0, high_inclusive=True)
        check_choice("damping_mode", group["damping_mode"], DAMPING_MODES)
        check_choice("factor_init", group["factor_init"], FACTOR_INITS)

    def _init_layer_state(self, layer: KroneckerLayer) -> dict[str, Tensor]:
        dtype_a, dtype_g = self.preconditioner_dtypes(layer)
        device = layer.weight.device
        start = torch.eye if layer.group["factor_init"] == "identity" else torch.zeros
        if _diagonal_a(layer):  # the diagonals of I or 0
            a = (torch.ones if start is torch.eye else torch.zeros)(layer.dim_in, dtype=dtype_a, device=device)
            a_inv = torch.ones(layer.dim_in, dtype=dtype_a, device=device)
        else:
            a = start(layer.dim_in, layer.dim_in, dtype=dtype_a, device=device)
            a_inv = torch.eye(layer.dim_in, dtype=dtype_a, device=device)
        return {
            "A": a,
            "G": start(layer.dim_out, layer.dim_out, dtype=dtype_g, device=device),
            "A_inv": a_inv,
            "G_inv": torch.eye(layer.dim_out, dtype=dtype_g, device=device),
            "updates": torch.zeros((), dtype=torch.int64),
        }

    def _layer_layout(self, layer: KroneckerLayer) -> dict:
        if _diagonal_a(layer):
            return {"method": "kfac", "module": layer.kind, "A": {"dim": layer.dim_in, "structure": "diagonal"},
                    "G": {"dim": layer.dim_out}}
        return {"method": "kfac", "A": {"dim": layer.dim_in}, "G": {"dim": layer.dim_out}}

    def _layer_tensor_shapes(self, layer: KroneckerLayer) -> tuple[dict, dict]:
        d_in, d_out = layer.dim_in, layer.dim_out
        a_shape = (d_in,) if _diagonal_a(layer) else (d_in, d_in)
        return {"A": a_shape, "G": (d_out, d_out), "A_inv": a_shape, "G_inv": (d_out, d_out), "updates": ()}, {}

    def _statistics_numel(self, layer: KroneckerLayer) -> tuple[int, int]:
        return layer.dim_in if _diagonal_a(layer) else layer.dim_in**2, layer.dim_out**2

    def _statistics(self, layer: KroneckerLayer, x_in: Rows, x_out: Rows) -> tuple[Tensor, Tensor]:
        a = x_in.square_sums() if _diagonal_a(layer) else x_in.gram().flatten()
        return a, x_out.gram().flatten()

    def _update_preconditioner(self, layer: KroneckerLayer, a: Tensor, g: Tensor) -> dict[str, Tensor]:
        state = self.layer_state[layer.name]
        group = layer.group
        decay = group["stat_decay"]
        if decay is None:
            beta = resolve_lr_cov(group["lr_cov"], self.steps)
            check_range("lr_cov" + (f" (schedule at step {self.steps})" if callable(group["lr_cov"]) else ""),
                        beta, 0.0, 1.0, high_inclusive=True)
            decay = 1.0 - beta
        first = int(state["updates"]) == 0 and group["factor_init"] == "statistics"
        a = a.view_as(state["A"])
        g = g.view_as(state["G"])
        new_a = a if first else state["A"] * decay + a * (1.0 - decay)
        new_g = g if first else state["G"] * decay + g * (1.0 - decay)
        damping = group["damping"]
        if group["damping_mode"] == "split":
            damping = math.sqrt(damping)
        return {
            "A": new_a,
            "G": new_g,
            "A_inv": _damped_inverse(new_a, damping),
            "G_inv": _damped_inverse(new_g, damping),
            "updates": state["updates"] + 1,
        }

    def _precondition(self, layer: KroneckerLayer, grad: Tensor) -> Tensor:
        state = self.layer_state[layer.name]
        a_inv = state["A_inv"]
        x = grad.to(a_inv.dtype) * a_inv if a_inv.ndim == 1 else grad.to(a_inv.dtype) @ a_inv
        x = state["G_inv"] @ x.to(state["G_inv"].dtype)
        return x.to(grad.dtype)


def _diagonal_a(layer: KroneckerLayer) -> bool:
    """Whether ``A`` is kept as its diagonal: an embedding's, whose statistics of
    one-hot inputs (token counts) are diagonal, and whose ``V × V`` matrix would
    hold only zeros off it."""
    return layer.kind == "Embedding"


def _damped_inverse(mat: Tensor, damping: float) -> Tensor:
    """``(mat + damping·I)⁻¹`` computed in float32 or better, in ``mat``'s dtype
    (a 1-D ``mat`` is a diagonal matrix's diagonal)."""
    work = mat.to(torch.promote_types(mat.dtype, torch.float32))
    if mat.ndim == 1:
        return (work + damping).reciprocal_().to(mat.dtype)
    work = work + damping * torch.eye(mat.shape[0], dtype=work.dtype, device=work.device)
    inverse, info = torch.linalg.inv_ex(work)
    # A failed inverse becomes NaN, which the finite check rejects; masked on the
    # device, since reading ``info`` on the host would synchronise once per factor.
    inverse = inverse.masked_fill_(info != 0, float("nan"))
    return inverse.to(mat.dtype)
