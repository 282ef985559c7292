"""First-order updates for parameters the Kronecker methods do not cover.

Norm layers, embeddings, positional embeddings, class tokens and any other
parameter outside ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` are trained by AdamW (default) or SGD
inside the same optimizer object, so that Lightning sees one optimizer. The updates
use multi-tensor (``foreach``) kernels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


_HALF = (torch.float16, torch.bfloat16)


def adamw_step(params: list[Tensor], state: dict, group: dict) -> None:
    """One decoupled-weight-decay Adam step for the parameters that have a gradient.

    The moments of half-precision parameters are kept in float32: in float16
    the squared gradients underflow and ``eps`` rounds to zero.

    Args:
        params: Parameters of one fallback group, all with ``.grad``.
        state: The optimizer's per-parameter state (``exp_avg``, ``exp_avg_sq``,
            ``step``).
        group: The parameter group (``lr``, ``weight_decay``, ``fallback_betas``,
            ``fallback_eps``).
    """
    if not params:
        return
    lr, weight_decay = group["lr"], group["weight_decay"]
    beta1, beta2 = group["fallback_betas"]
    eps = group["fallback_eps"]
    grads, exp_avgs, exp_avg_sqs, step_counts = [], [], [], []
    for p in params:
        st = state[p]
        if "exp_avg" not in st:
            moment_dtype = torch.float32 if p.dtype in _HALF else p.dtype
            st["step"] = torch.tensor(0.0)
            st["exp_avg"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.preserve_format)
        step_counts.append(st["step"])
        grads.append(p.grad.to(st["exp_avg"].dtype))
        exp_avgs.append(st["exp_avg"])
        exp_avg_sqs.append(st["exp_avg_sq"])
    # The counts live on the host (as torch.optim keeps them): one operation for
    # all, and one read, where a count per parameter took two each.
    torch._foreach_add_(step_counts, 1.0)
    if all(t.device.type == "cpu" for t in step_counts):
        steps = [int(t) for t in torch.stack(step_counts).tolist()]
    else:
        steps = [int(t.item()) for t in step_counts]
    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, [math.sqrt(1.0 - beta2**t) for t in steps])
    torch._foreach_add_(denoms, eps)
    step_sizes = [-lr / (1.0 - beta1**t) for t in steps]
    if all(p.dtype == m.dtype for p, m in zip(params, exp_avgs)):
        torch._foreach_addcdiv_(params, exp_avgs, denoms, step_sizes)
        return
    updates = torch._foreach_div(exp_avgs, denoms)
    torch._foreach_mul_(updates, step_sizes)
    torch._foreach_add_(params, [u.to(p.dtype) for p, u in zip(params, updates)])


def momentum_step(
    params: list[Tensor], updates: list[Tensor], state: dict, lr: float, momentum: float, weight_decay: float
) -> None:
    """``d ← u + γθ``, ``μ ← α μ + d``, ``θ ← θ − lr μ`` (heavy-ball momentum).

    Shared by the SGD fallback (``updates`` = gradients) and the Kronecker
    methods (``updates`` = preconditioned gradients, SPEC §1).

    Args:
        params: Parameters to update.
        updates: One update direction per parameter (not modified).
        state: Per-parameter state holding ``momentum_buffer``.
        lr: Learning rate.
        momentum: Momentum factor α.
        weight_decay: L2 weight decay γ added to the update.
    """
    if not params:
        return
    if weight_decay != 0.0:
        updates = torch._foreach_add(updates, params, alpha=weight_decay)
    if momentum != 0.0:
        bufs = []
        for p in params:
            st = state[p]
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            bufs.append(st["momentum_buffer"])
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, updates)
        updates = bufs
    torch._foreach_add_(params, updates, alpha=-lr)


def sgd_step(params: list[Tensor], state: dict, group: dict) -> None:
    """One SGD step with (heavy-ball) momentum and L2 weight decay.

    Args:
        params: Parameters of one fallback group, all with ``.grad``.
        state: The optimizer's per-parameter state (``momentum_buffer``).
        group: The parameter group (``lr``, ``momentum``, ``weight_decay``).
    """
    momentum_step(params, [p.grad for p in params], state, group["lr"], group["momentum"], group["weight_decay"])


FALLBACK_STEPS = {"adamw": adamw_step, "sgd": sgd_step}
