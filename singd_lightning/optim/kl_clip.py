"""KFAC's KL clip of the preconditioned updates (``kl_clip``), shared by the
replicated and the distributed step."""

from __future__ import annotations

import torch
from torch import Tensor


def kl_clip_scale(kl_clip: float, terms: list[Tensor]) -> Tensor:
    """KFAC's KL clip: ``ν = min(1, sqrt(κ / |Σ_l lr_l² ⟨u_l, g_l⟩|))`` as a 0-dim
    tensor (no host synchronisation), for the layers' ``terms``
    ``lr_l² ⟨u_l, g_l⟩`` of preconditioned update ``u_l`` and gradient ``g_l``.

    ``lr² ⟨u, g⟩ = lr² gᵀ P g`` is the squared length of the step ``lr · P g`` in
    the metric ``P⁻¹`` (the Fisher the preconditioner approximates): twice the
    KL divergence the step causes, to second order. Scaling every update by ν
    bounds it by κ, whatever the preconditioner's growth.
    """
    total = torch.stack([t.reshape(()).to(terms[0].device) for t in terms]).sum().abs()
    # 0/0 (no gradient at all) is no reason to scale: ν = 1 then.
    return (kl_clip / total.clamp(min=torch.finfo(total.dtype).tiny)).sqrt().clamp(max=1.0)
