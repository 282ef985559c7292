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


# ---------------------------------------------------------------- row matrices
class Rows:
    """A matrix ``Xᵀ`` of shape ``(d, n)`` whose columns are rows of ``A`` (or ``G``),
    built only as far as a statistic needs it.

    Sparse structures need little of ``X Xᵀ``: a diagonal factor only needs the
    row sums of squares, which for a convolution cost one pass over the input
    instead of an im2col copy that is ``k²`` times larger. Structures call
    :meth:`matrix` or :meth:`square_sums`; both are computed at most once.

    Args:
        build: Returns the ``(d, n)`` matrix.
        n: Number of rows ``n``.
        square_sums: Returns ``diag(X Xᵀ)``, the ``(d,)`` sums of squares over the
            ``n`` rows, without building the matrix; None derives it from it.
    """

    def __init__(self, build: Callable[[], Tensor], n: int, square_sums: Callable[[], Tensor] | None = None) -> None:
        self._build = build
        self._square_sums = square_sums
        self._matrix: Tensor | None = None
        self.n = n
        self.scale = 1.0

    def matrix(self) -> Tensor:
        """``X``, ``(d, n)``, times :attr:`scale`."""
        if self._matrix is None:
            mat = self._build()
            self._matrix = mat if self.scale == 1.0 else mat * self.scale
        return self._matrix

    def square_sums(self) -> Tensor:
        """``Σ_rows X²``, ``(d,)``, times :attr:`scale` ²."""
        if self._matrix is not None or self._square_sums is None:
            return self.matrix().square().sum(dim=-1)
        sums = self._square_sums()
        return sums if self.scale == 1.0 else sums * self.scale**2


def _pad_like_conv(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``x`` padded exactly as ``conv`` pads it (any mode, string paddings)."""
    if conv.padding_mode != "zeros":
        return F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return x
        # "same": PyTorch puts the odd pixel of the total padding on the right/bottom.
        pads = []
        for k, d in zip(reversed(conv.kernel_size), reversed(conv.dilation)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads)
    (ph, pw) = conv.padding
    return F.pad(x, (pw, pw, ph, ph)) if ph or pw else x


def conv2d_input(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """The input as the kernel sees it: padded, and with channel groups averaged
    (grouped convolutions share one Kronecker factor across groups, as in the
    reference package). ``(N, C_in, H, W)`` → ``(N, C_in/groups, H', W')``."""
    if conv.groups > 1:
        x = x.unflatten(1, (conv.groups, -1)).mean(dim=1)
    return _pad_like_conv(x, conv)


def conv2d_patch_view(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """A strided view of all im2col patches of a :func:`conv2d_input`.

    Returns:
        A view of shape ``(C_in/groups, k1, k2, N, O1, O2)`` (no copy of the
        patches): entry ``[c, i, j, b, o1, o2]`` is the input pixel that kernel
        entry ``(c, i, j)`` meets at output location ``(o1, o2)`` of sample ``b``.
    """
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    n, c, h, w = x.shape
    out_h, out_w = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    st_n, st_c, st_h, st_w = x.stride()
    return x.as_strided(
        (c, kh, kw, n, out_h, out_w),
        (st_c, st_h * dh, st_w * dw, st_n, st_h * sh, st_w * sw),
    )


def _layout_rows(view: Tensor, feature_dims: int, has_bias: bool) -> Tensor:
    """Copy a view of shape ``(*features, *rows)`` into a contiguous ``(d [+1], n)``
    matrix, writing the bias's row of ones in the same pass."""
    d = math.prod(view.shape[:feature_dims])
    out = view.new_empty(d + int(has_bias), *view.shape[feature_dims:])
    out[:d].view(view.shape).copy_(view)
    if has_bias:
        out[d].fill_(1.0)
    return out.reshape(out.shape[0], -1)


def input_rows(layer: KroneckerLayer, x: Tensor, approx: str) -> Rows:
    """``Aᵀ`` (un-normalised) as :class:`Rows`: ``(d_K, n)``; the last row is ones
    when the layer has a bias. The matrix is built in a single copy."""
    module, has_bias = layer.module, layer.has_bias
    if isinstance(module, nn.Conv2d):
        if x.ndim == 3:  # un-batched input
            x = x.unsqueeze(0)
        x = conv2d_input(x, module)
        patches = conv2d_patch_view(x, module)  # (c, k1, k2, N, O1, O2)
        d = patches.shape[0] * patches.shape[1] * patches.shape[2]
        if approx == "expand":
            n = patches.shape[3] * patches.shape[4] * patches.shape[5]

            def square_sums() -> Tensor:
                # Squares of the padded input, summed over the same strided windows.
                sums = conv2d_patch_view(x.square(), module).sum(dim=(3, 4, 5)).flatten()
                return torch.cat([sums, sums.new_full((1,), n)]) if has_bias else sums

            return Rows(lambda: _layout_rows(patches, 3, has_bias), n, square_sums)
        mean = patches.mean(dim=(4, 5)).reshape(d, -1)  # (d, N): no im2col copy
        return Rows(lambda: _layout_rows(mean, 1, has_bias), mean.shape[1])
    d = x.shape[-1]
    flat = x.reshape(-1, d)
    if approx == "reduce" and x.ndim > 2:
        flat = x.reshape(x.shape[0], -1, d).mean(dim=1)
    n = flat.shape[0]

    def square_sums() -> Tensor:
        sums = flat.square().sum(dim=0)
        return torch.cat([sums, sums.new_full((1,), n)]) if has_bias else sums

    if not has_bias:
        return Rows(lambda: flat.T, n, square_sums)
    return Rows(lambda: _layout_rows(flat.T, 1, True), n, square_sums)


def output_gradient_rows(
    layer: KroneckerLayer, g: Tensor, approx: str, loss_average: str | None
) -> tuple[Rows, int]:
    """``Gᵀ`` (un-scaled) as :class:`Rows`, ``(d_o, n')``, and the number ``N`` of
    loss terms the output gradient averages over."""
    module = layer.module
    if isinstance(module, nn.Conv2d):
        if g.ndim == 3:
            g = g.unsqueeze(0)
        batch, shared = g.shape[0], g.shape[2:].numel()
        if approx == "expand":
            rows = Rows(
                lambda: g.transpose(0, 1).reshape(g.shape[1], -1),
                batch * shared,
                lambda: g.square().sum(dim=(0, 2, 3)),
            )
        else:
            summed = g.sum(dim=(2, 3))
            rows = Rows(lambda: summed.T, batch)
    else:
        if g.ndim <= 1:
            g = g.unsqueeze(0)
        d = g.shape[-1]
        batch, shared = g.shape[0], g.shape[1:-1].numel()
        flat = g.reshape(-1, d) if approx == "expand" or g.ndim == 2 else g.reshape(batch, -1, d).sum(dim=1)
        rows = Rows(lambda: flat.T, flat.shape[0], lambda: flat.square().sum(dim=0))
    if loss_average is None:
        num_terms = 1
    elif loss_average == "batch":
        num_terms = batch
    else:
        num_terms = batch * shared
    return rows, num_terms


def input_matrix(layer: KroneckerLayer, x: Tensor, approx: str) -> tuple[Tensor, int]:
    """``Aᵀ`` (un-normalised), ``(d_K, n)``, and its number of rows ``n``."""
    rows = input_rows(layer, x, approx)
    return rows.matrix(), rows.n


def output_gradient_matrix(
    layer: KroneckerLayer, g: Tensor, approx: str, loss_average: str | None
) -> tuple[Tensor, int]:
    """``Gᵀ`` (un-scaled), ``(d_o, n')``, and the number ``N`` of loss terms."""
    rows, num_terms = output_gradient_rows(layer, g, approx, loss_average)
    return rows.matrix(), num_terms


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
            x_in = input_rows(layer, x.to(dtype_k), approx)
            x_out, num_terms = output_gradient_rows(layer, grad_output.to(dtype_c), approx, loss_average)
            n = x_in.n
            w_in, w_out = 1.0, 1.0 / scale**2
            if dtype_k == torch.float16:
                x_in.scale, w_in = 1.0 / math.sqrt(n), float(n)
            if dtype_c == torch.float16:
                x_out.scale, w_out = math.sqrt(num_terms) / scale, 1.0 / num_terms
            self.sink(layer, x_in, x_out, w_in, w_out, n, num_terms)

    @staticmethod
    def remove(layers: list[KroneckerLayer]) -> None:
        """Remove the hooks of ``layers``."""
        for layer in layers:
            for handle in layer.handles:
                handle.remove()
            layer.handles.clear()
