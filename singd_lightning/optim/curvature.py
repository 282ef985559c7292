"""Kronecker layers and the collection of their curvature statistics.

A :class:`KroneckerLayer` is an ``nn.Linear`` or ``nn.Conv2d`` whose weight (and
bias) the Kronecker methods precondition. The :class:`CurvatureCollector` installs
one forward hook per layer; in steps that collect statistics the hook places a
tensor hook on the layer's output, which turns the stored input and the incoming
output gradient into the matrices of SPEC §1 and hands them to a *sink* (the
optimizer decides what to compute from them: structured projections for SINGD,
dense Gram matrices for KFAC).

Conventions (SPEC §1), for one backward pass through a layer: the sink receives
``x_in`` (``Aᵀ``, shape ``(d_K, n)``, rows of ``A`` = the possibly averaged inputs
with a trailing 1 for a bias) and ``x_out`` (``Gᵀ``, shape ``(d_o, n')``), each with
a weight ``w`` such that ``w · stat(x)`` is the pass's un-normalised contribution:
``stat(Aᵀ)`` for the input side and ``stat(Gᵀ) / s²`` for the output side, where
``s`` is the loss scale. The matrices are left un-scaled (no extra copy) except in
float16, whose range needs ``Aᵀ/√n`` and ``Gᵀ·√N/s`` before the products.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

SUPPORTED_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
LOSS_AVERAGES = ("batch", "batch+sequence", None)
KFAC_APPROXIMATIONS = ("expand", "reduce")


@dataclass(eq=False)
class KroneckerLayer:
    """A supported layer and the parameters the Kronecker method updates.

    Attributes:
        name: The module's name in the (unwrapped) model; keys its state.
        module: The ``nn.Linear`` or ``nn.Conv2d``.
        group: The parameter group holding its parameters.
        has_bias: Whether the bias is trained with the weight (as the last column
            of the augmented weight).
    """

    name: str
    module: nn.Module
    group: dict
    has_bias: bool
    group_index: int = 0
    handles: list[RemovableHandle] = field(default_factory=list, repr=False)

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight

    @property
    def params(self) -> list[nn.Parameter]:
        return [self.module.weight, self.module.bias] if self.has_bias else [self.weight]

    @property
    def dim_in(self) -> int:
        """``d_K``: the (augmented) input dimension."""
        return self.weight[0].numel() + int(self.has_bias)

    @property
    def dim_out(self) -> int:
        """``d_C = d_o``: the output dimension."""
        return self.weight.shape[0]

    def gradient_matrix(self) -> Tensor | None:
        """The augmented gradient ``Ĝ``, ``(d_o, d_K)``; None if the weight has none."""
        grad = self.weight.grad
        if grad is None:
            return None
        mat = grad.flatten(start_dim=1)
        if self.has_bias:
            bias_grad = self.module.bias.grad
            if bias_grad is None:
                bias_grad = torch.zeros_like(self.module.bias)
            mat = torch.cat([mat, bias_grad.unsqueeze(1)], dim=1)
        return mat

    def split(self, mat: Tensor) -> list[Tensor]:
        """Split an augmented ``(d_o, d_K)`` matrix into tensors shaped like params."""
        if self.has_bias:
            return [mat[:, :-1].reshape_as(self.weight), mat[:, -1].reshape_as(self.module.bias)]
        return [mat.reshape_as(self.weight)]


# ---------------------------------------------------------------- input side
def _conv_explicit_input(x: Tensor, conv: nn.Conv2d) -> tuple[Tensor, tuple[int, int]]:
    """Pad ``x`` as ``conv`` would and return it with the padding left for unfold."""
    if conv.padding_mode != "zeros":
        return F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), (0, 0)
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return x, (0, 0)
        # "same": PyTorch puts the odd pixel of the total padding on the right/bottom.
        pads = []
        for k, d in zip(reversed(conv.kernel_size), reversed(conv.dilation)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads), (0, 0)
    return x, conv.padding


def conv2d_patches(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """Im2col patches of a Conv2d input, channel groups averaged.

    Args:
        x: Input, ``(N, C_in, H, W)``.
        conv: The convolution.

    Returns:
        ``(N, C_in/groups · k1 · k2, L)`` with ``L`` the number of output locations.
        Grouped convolutions share one Kronecker factor across groups, so the
        group's channels are averaged (as the reference package does).
    """
    if conv.groups > 1:
        x = x.unflatten(1, (conv.groups, -1)).mean(dim=1)
    x, padding = _conv_explicit_input(x, conv)
    return F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)


def _with_ones_row(mat: Tensor) -> Tensor:
    """``[mat; 1ᵀ]`` for ``mat`` of shape ``(d, *rows)``, in one copy."""
    out = mat.new_empty(mat.shape[0] + 1, *mat.shape[1:])
    out[:-1].copy_(mat)
    out[-1].fill_(1.0)
    return out


def input_matrix(layer: KroneckerLayer, x: Tensor, approx: str) -> tuple[Tensor, int]:
    """``Aᵀ`` (un-normalised), ``(d_K, n)``, and its number of rows ``n``.

    The bias column of ones is written in the same copy that lays the rows out,
    so a layer's input is copied at most once (convolutions: after im2col).
    """
    module = layer.module
    if isinstance(module, nn.Conv2d):
        if x.ndim == 3:  # un-batched input
            x = x.unsqueeze(0)
        patches = conv2d_patches(x, module)  # (N, d, L)
        mat = patches.transpose(0, 1) if approx == "expand" else patches.mean(dim=2).T
    else:
        d_in = x.shape[-1]
        if approx == "expand" or x.ndim <= 2:
            mat = x.reshape(-1, d_in).T
        else:
            mat = x.reshape(x.shape[0], -1, d_in).mean(dim=1).T
    if layer.has_bias:
        mat = _with_ones_row(mat)
    mat = mat.reshape(mat.shape[0], -1)
    return mat, mat.shape[1]


def output_gradient_matrix(
    layer: KroneckerLayer, g: Tensor, approx: str, loss_average: str | None
) -> tuple[Tensor, int]:
    """``Gᵀ`` (un-scaled), ``(d_o, n')``, and the number ``N`` of loss terms."""
    module = layer.module
    if isinstance(module, nn.Conv2d):
        if g.ndim == 3:
            g = g.unsqueeze(0)
        batch, shared = g.shape[0], g.shape[2:].numel()
        if approx == "expand":
            mat = g.transpose(0, 1).flatten(start_dim=1)
        else:
            mat = g.sum(dim=(2, 3)).T
    else:
        d_out = g.shape[-1]
        if g.ndim <= 1:
            g = g.unsqueeze(0)
        batch, shared = g.shape[0], g.shape[1:-1].numel()
        if approx == "expand" or g.ndim == 2:
            mat = g.reshape(-1, d_out).T
        else:
            mat = g.reshape(batch, -1, d_out).sum(dim=1).T
    if loss_average is None:
        num_terms = 1
    elif loss_average == "batch":
        num_terms = batch
    else:
        num_terms = batch * shared
    return mat, num_terms


# ------------------------------------------------------------------ collector
Sink = Callable[[KroneckerLayer, Tensor, Tensor, float, float, int, int], None]


class CurvatureCollector:
    """Hooks that feed the per-pass matrices ``x_in`` and ``x_out`` to a sink.

    Args:
        layers: The layers to hook.
        sink: Called as ``sink(layer, x_in, x_out, w_in, w_out, n, N)`` once per
            backward pass through a layer in a collecting step (see the module
            docstring); ``n`` counts the rows of ``A``, ``N`` the loss terms.
        is_collecting: Tells, per layer, whether the current step collects.
        dtypes: Gives, per layer, the ``(K dtype, C dtype)`` of its factors.
        grad_scale: Gives the gradient scale to divide output gradients by.
    """

    def __init__(
        self,
        layers: list[KroneckerLayer],
        sink: Sink,
        is_collecting: Callable[[KroneckerLayer], bool],
        dtypes: Callable[[KroneckerLayer], tuple[torch.dtype, torch.dtype]],
        grad_scale: Callable[[], float],
    ) -> None:
        self.sink = sink
        self.is_collecting = is_collecting
        self.dtypes = dtypes
        self.grad_scale = grad_scale
        self.enabled = True
        for layer in layers:
            layer.handles.append(
                layer.module.register_forward_hook(partial(self._forward_hook, layer))
            )

    def _forward_hook(self, layer: KroneckerLayer, module: nn.Module, args, output) -> None:
        if not (
            self.enabled
            and torch.is_grad_enabled()
            and isinstance(output, Tensor)
            and output.requires_grad
            and self.is_collecting(layer)
        ):
            return
        # The input is kept alive by autograd for the weight gradient anyway.
        output.register_hook(partial(self._backward_hook, layer, args[0].detach()))

    @torch.no_grad()
    def _backward_hook(self, layer: KroneckerLayer, x: Tensor, grad_output: Tensor) -> None:
        group = layer.group
        approx, loss_average = group["kfac_approx"], group["loss_average"]
        dtype_k, dtype_c = self.dtypes(layer)
        scale = self.grad_scale()
        with torch.autocast(device_type=x.device.type, enabled=False):
            x_in, n = input_matrix(layer, x.to(dtype_k), approx)
            x_out, num_terms = output_gradient_matrix(
                layer, grad_output.to(dtype_c), approx, loss_average
            )
            w_in, w_out = 1.0, 1.0 / scale**2
            if dtype_k == torch.float16:
                x_in, w_in = x_in * (1.0 / math.sqrt(n)), float(n)
            if dtype_c == torch.float16:
                x_out, w_out = x_out * (math.sqrt(num_terms) / scale), 1.0 / num_terms
            self.sink(layer, x_in, x_out, w_in, w_out, n, num_terms)

    @staticmethod
    def remove(layers: list[KroneckerLayer]) -> None:
        """Remove the hooks of ``layers``."""
        for layer in layers:
            for handle in layer.handles:
                handle.remove()
            layer.handles.clear()
