"""Kronecker layers and the collection of their curvature statistics.

A :class:`KroneckerLayer` is an ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` or
``nn.Embedding`` whose weight (and bias) the Kronecker methods precondition (a
``Conv1d`` as a ``Conv2d`` of unit height, see :class:`ConvGeometry`; an
``Embedding`` as the ``nn.Linear`` without bias on one-hot inputs, see
:class:`EmbeddingLayer`). The :class:`CurvatureCollector` installs
one forward hook per layer; in steps that collect statistics the hook places a
tensor hook on the layer's output, which turns the stored input and the incoming
output gradient into the matrices of SPEC §1 and hands them to a *sink* (the
optimizer decides what to compute from them: structured projections for SINGD,
dense Gram matrices for KFAC). In a ``torch.compile``d forward pass the hook instead
routes the output gradient through an op the compiler keeps opaque (see
:func:`_curvature_grad`): the model stays one graph, compiled once, and the
statistics are computed eagerly from the same tensors as in eager mode.

Conventions (SPEC §1), for one backward pass through a layer: the sink receives
``x_in`` (``Aᵀ``, shape ``(d_K, n)``, rows of ``A`` = the possibly averaged inputs
with a trailing 1 for a bias) and ``x_out`` (``Gᵀ``, shape ``(d_o, n')``), each with
a weight ``w`` such that ``w · stat(x)`` is the pass's un-normalised contribution:
``stat(Aᵀ)`` for the input side and ``stat(Gᵀ) / s²`` for the output side, where
``s`` is the loss scale. The matrices are left un-scaled (no extra copy) except in
float16, whose range needs ``Aᵀ/√n`` and ``Gᵀ·√N/s`` before the products.
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from singd_lightning.optim.reductions import launch_bound
from singd_lightning.structures._utils import symmetric_matmul

SUPPORTED_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
#: The kinds of preconditioned layers, by the ``torch.nn`` class they derive from
#: (what a per-kind option such as SINGD's ``layer_structures`` is keyed by).
LAYER_KINDS: tuple[str, ...] = ("Linear", "Conv1d", "Conv2d", "Embedding")
LOSS_AVERAGES = ("batch", "batch+sequence", None)
KFAC_APPROXIMATIONS = ("expand", "reduce")


@dataclass(eq=False)
class KroneckerLayer:
    """A supported layer and the parameters the Kronecker method updates.

    Attributes:
        name: The module's name in the (unwrapped) model; keys its state.
        module: The ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Embedding``.
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
        """The augmented gradient ``Ĝ``, ``(d_o, d_K)``: a missing weight or bias
        gradient counts as zero; None if neither has one."""
        grad = self.weight.grad
        bias_grad = self.module.bias.grad if self.has_bias else None
        if grad is None and bias_grad is None:
            return None
        if grad is None:
            grad = torch.zeros_like(self.weight)
        mat = grad.flatten(start_dim=1)
        if self.has_bias:
            if bias_grad is None:
                bias_grad = torch.zeros_like(self.module.bias)
            mat = torch.cat([mat, bias_grad.to(mat.dtype).unsqueeze(1)], dim=1)
        return mat

    @staticmethod
    def stacked_gradient_matrices(layers: list[KroneckerLayer]) -> Tensor:
        """The :meth:`gradient_matrix` of same-shaped ``layers`` stacked,
        ``(L, d_o, d_K)``: for layers with weight and bias gradients of one
        dtype, from the stacked weight and bias gradients (three operations, not
        one per layer); otherwise layer by layer."""
        plain = all(type(layer) is KroneckerLayer and layer.has_bias for layer in layers)
        grads = [(layer.weight.grad, layer.module.bias.grad) for layer in layers] if plain else []
        if plain and all(w is not None and b is not None and w.dtype == b.dtype == grads[0][0].dtype
                         for w, b in grads):
            weights = torch.stack([w for w, _ in grads]).flatten(start_dim=2)
            return torch.cat([weights, torch.stack([b for _, b in grads]).unsqueeze(-1)], dim=-1)
        return torch.stack([layer.gradient_matrix() for layer in layers])

    def split(self, mat: Tensor) -> list[Tensor]:
        """Split an augmented ``(d_o, d_K)`` matrix into tensors shaped like params."""
        if self.has_bias:
            return [mat[:, :-1].reshape_as(self.weight), mat[:, -1].reshape_as(self.module.bias)]
        return [mat.reshape_as(self.weight)]

    @property
    def kind(self) -> str:
        """The layer's kind, one of :data:`LAYER_KINDS`."""
        return layer_kind(self.module)


class EmbeddingLayer(KroneckerLayer):
    """An ``nn.Embedding`` as the ``nn.Linear`` without bias that it is on one-hot
    inputs: ``y = W_linᵀ … = onehot(x) W`` with ``W_lin = Wᵀ``, ``(D, V)``.

    So ``d_K = V`` (``num_embeddings``) and ``d_o = D`` (``embedding_dim``); the
    augmented gradient is ``W.grad`` transposed. The input statistic ``A Aᵀ`` of
    one-hot rows is diagonal, the token counts: it is computed from them
    (``bincount``), never from one-hot vectors (see :func:`input_rows`). The
    ``padding_idx`` row, which ``nn.Embedding`` never trains (its gradient is
    zero), gets a zero update whatever the structure of ``K``.
    """

    @property
    def dim_in(self) -> int:
        return self.module.num_embeddings

    @property
    def dim_out(self) -> int:
        return self.module.embedding_dim

    def gradient_matrix(self) -> Tensor | None:
        grad = self.weight.grad
        return None if grad is None else grad.mT

    def split(self, mat: Tensor) -> list[Tensor]:
        update = mat.mT
        if self.module.padding_idx is not None:
            update[self.module.padding_idx] = 0.0
        return [update]


def layer_kind(module: nn.Module) -> str:
    """The kind (:data:`LAYER_KINDS`) of a supported module: the name of the
    ``torch.nn`` class it derives from (``"Linear"`` for a subclass of ``nn.Linear``)."""
    for cls in (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Linear):
        if isinstance(module, cls):
            return cls.__name__
    raise TypeError(f"{type(module).__name__} is not a supported layer ({', '.join(LAYER_KINDS)}).")


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a module of a supported class is not preconditioned (None: it is).

    An ``nn.Embedding`` with ``sparse=True`` has sparse gradients, which no
    Kronecker update takes; one with ``scale_grad_by_freq=True`` has a gradient
    that is not that of a linear layer (rescaled by token counts), so the
    statistics would not match it.
    """
    if isinstance(module, nn.Embedding):
        if module.sparse:
            return "sparse=True (sparse gradients)"
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq=True (a gradient rescaled by token counts)"
    return None


def kronecker_modules(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], dict[str, str]]:
    """The modules of ``model`` that the Kronecker methods precondition, and why
    the others of supported classes are not.

    A weight shared by two supported modules (tied input and output embeddings)
    is preconditioned by neither: its gradient sums both uses, which no single
    layer's factors describe; it goes to the first-order fallback.

    Returns:
        ``[(name, module), ...]`` in ``named_modules`` order, and ``{name: reason}``
        for the modules of supported classes left out.
    """
    candidates = [(name, m) for name, m in model.named_modules() if isinstance(m, SUPPORTED_MODULES)]
    users: dict[int, list[str]] = {}
    for name, module in candidates:
        users.setdefault(id(module.weight), []).append(name)
    kept, left_out = [], {}
    for name, module in candidates:
        reason = unsupported_reason(module)
        shared = [other for other in users[id(module.weight)] if other != name]
        if reason is None and shared:
            reason = f"its weight is shared with {', '.join(shared)}"
        if reason is None:
            kept.append((name, module))
        else:
            left_out[name] = reason
    return kept, left_out


def make_layer(name: str, module: nn.Module, group: dict, has_bias: bool, group_index: int = 0) -> KroneckerLayer:
    """The :class:`KroneckerLayer` (or :class:`EmbeddingLayer`) of a supported module."""
    cls = EmbeddingLayer if isinstance(module, nn.Embedding) else KroneckerLayer
    return cls(name, module, group, has_bias and not isinstance(module, nn.Embedding), group_index)


# ---------------------------------------------------------------- row matrices
class Rows:
    """A matrix ``X`` of shape ``(d, n)`` whose columns are rows of ``A`` (or ``G``),
    built only as far as a statistic needs it.

    Sparse structures need little of ``X Xᵀ``: a diagonal factor only needs the
    row sums of squares, which for a convolution cost one pass over the input
    instead of an im2col copy that is ``k²`` times larger. And every statistic is
    a sum over the ``n`` columns, so :meth:`reduce` builds ``X`` a few columns at a
    time: the im2col copy of a convolution never exists in full, which keeps peak
    memory near that of a first-order optimizer.

    The columns come in *units* of ``unit_columns`` each (the samples of a batch
    for a convolution: one column per output location), and a chunk is a range of
    whole units.

    Args:
        build: ``build(start, stop, row_major)`` returns the ``(d, (stop − start)·
            unit_columns)`` columns of units ``start … stop − 1``; ``row_major`` asks
            for the transpose of a contiguous matrix (each column contiguous), a
            hint that a builder may ignore where the other layout is much cheaper.
        dim: Number of rows ``d``.
        units: Number of units.
        unit_columns: Columns per unit.
        dtype: The dtype of the built columns.
        square_sums: Returns ``diag(X Xᵀ)``, the ``(d,)`` sums of squares over the
            ``n`` columns, without building them; None derives it from :meth:`reduce`.
        copies: Whether ``build`` copies; a view is handed out whole, unchunked.
        cross: ``cross(index)`` returns ``X[index] Xᵀ``, ``(k, d)``, without building
            ``X``; None derives it from :meth:`reduce`.
        gram: Returns ``X Xᵀ`` without building ``X``; None derives it from
            :meth:`reduce`.
    """

    #: Largest chunk :meth:`reduce` builds at once by default, in bytes (2 MiB).
    chunk_bytes: int = 1 << 21

    def __init__(
        self,
        build: Callable[[int, int, bool], Tensor],
        dim: int,
        units: int,
        unit_columns: int = 1,
        dtype: torch.dtype = torch.float32,
        square_sums: Callable[[], Tensor] | None = None,
        copies: bool = True,
        cross: Callable[[Tensor], Tensor] | None = None,
        gram: Callable[[], Tensor] | None = None,
    ) -> None:
        self._cross = cross
        self._gram = gram
        self._build = build
        self._copies = copies
        self._square_sums = square_sums
        self._matrix: Tensor | None = None
        self.dim = dim
        self.units = units
        self.unit_columns = unit_columns
        self.dtype = dtype
        self.n = units * unit_columns
        self.scale = 1.0

    def _scaled(self, x: Tensor) -> Tensor:
        return x if self.scale == 1.0 else x * self.scale

    def _direct(self, product: Callable | None) -> bool:
        """Whether to use a product computed straight from the source tensors: not
        once the matrix is built, and not with a scale (float16), which must apply
        before any product so that sums of squares stay in range."""
        return product is not None and self._matrix is None and self.scale == 1.0

    def matrix(self) -> Tensor:
        """``X``, ``(d, n)``, times :attr:`scale` (built in full, and kept)."""
        if self._matrix is None:
            self._matrix = self._scaled(self._build(0, self.units, False))
        return self._matrix

    def chunks(self, max_bytes: int | None = None, row_major: bool = False) -> Iterator[Tensor]:
        """``X`` (times :attr:`scale`) as consecutive ``(d, n_i)`` column blocks of at
        most ``max_bytes`` (default :attr:`chunk_bytes`; at least one unit each).
        ``row_major`` asks for contiguous columns where the blocks are built (a
        built :meth:`matrix` or a view is handed out as it is)."""
        if self._matrix is not None or not self._copies:
            yield self.matrix()
            return
        unit_bytes = self.dim * self.unit_columns * self.dtype.itemsize
        step = max(1, (max_bytes or self.chunk_bytes) // max(1, unit_bytes))
        for start in range(0, self.units, step):
            yield self._scaled(self._build(start, min(start + step, self.units), row_major))

    def reduce(
        self, statistic: Callable[[Tensor], Tensor], max_bytes: int | None = None, row_major: bool = False
    ) -> Tensor:
        """``Σ_i statistic(X_i)`` over the column blocks of :meth:`chunks`: equal to
        ``statistic(X)`` for a statistic that sums over columns (any ``Π(Sᵀ X Xᵀ S)``).
        Half-precision partial results are summed in float32."""
        total, dtype = None, None
        for chunk in self.chunks(max_bytes, row_major):
            part = statistic(chunk)
            if total is None:
                dtype = part.dtype
                total = part.to(torch.promote_types(dtype, torch.float32), copy=True)
            else:
                total.add_(part)
        if total is None:  # no columns at all
            return statistic(self.matrix())
        return total.to(dtype)

    def gram(self) -> Tensor:
        """``X Xᵀ``, ``(d, d)``, times :attr:`scale` ². Chunks hold at least ``d``
        columns (a chunk as large as the result) and four times the default bytes:
        a product's cost grows with its inner dimension, its output traffic does
        not, so longer chunks run nearer peak (3–12% faster for d ≤ 1152 on CPU)."""
        if self._direct(self._gram):
            return self._gram()
        max_bytes = max(4 * self.chunk_bytes, self.dim * self.dim * self.dtype.itemsize)
        return self.reduce(lambda x: symmetric_matmul(x, x.mT), max_bytes)

    def cross(self, index: Tensor) -> Tensor:
        """``X[index] Xᵀ``, ``(k, d)`` for ``k`` row indices, times :attr:`scale` ²: the
        products of a few rows with all rows, as sparse structures need them."""
        if self._direct(self._cross):
            return self._cross(index)
        return self.reduce(lambda x: x[..., index, :] @ x.mT)

    def square_sums(self) -> Tensor:
        """``Σ_columns X²``, ``(d,)``, times :attr:`scale` ²."""
        if self._direct(self._square_sums):
            return self._square_sums()
        return self.reduce(lambda x: x.square().sum(dim=-1))


def _square_sums(x: Tensor, dim: int | tuple[int, ...], keepdim: bool = False) -> Tensor:
    """``Σ x²`` over ``dim``, in ``x``'s dtype, never with a temporary of ``x``'s
    size: on :data:`~singd_lightning.optim.reductions.LAUNCH_BOUND_DEVICES` as the
    squared norm (one kernel however large ``x``, accumulated in at least
    float32); elsewhere the squares of slices summed (:func:`_sum_over_chunks`),
    several times faster on a CPU."""
    if launch_bound(x.device):
        dtype = torch.promote_types(x.dtype, torch.float32)
        return torch.linalg.vector_norm(x, 2, dim=dim, keepdim=keepdim, dtype=dtype).square().to(x.dtype)
    return _sum_over_chunks(x, lambda b: b.square().sum(dim=dim, keepdim=keepdim))


def _sum_over_chunks(x: Tensor, statistic: Callable[[Tensor], Tensor], max_elements: int = 1 << 18) -> Tensor:
    """``Σ_i statistic(x_i)`` over consecutive slices ``x_i`` of ``x``'s first
    dimension of about ``max_elements`` each: a reduction such as a sum of squares
    then never makes a temporary the size of ``x`` (large fresh allocations cost
    page faults on every call, small ones are reused)."""
    if x.ndim == 0:
        return statistic(x)
    step = max(1, max_elements // max(1, x.shape[1:].numel()))
    if step >= x.shape[0]:
        return statistic(x)
    total = statistic(x[:step])
    for start in range(step, x.shape[0], step):
        total.add_(statistic(x[start : start + step]))
    return total


@dataclass(frozen=True)
class ConvGeometry:
    """A convolution's geometry in two spatial dimensions, the only thing the
    im2col rows depend on besides the input.

    An ``nn.Conv1d`` is the ``nn.Conv2d`` of unit height with kernel ``(1, k)``,
    stride ``(1, s)``, padding ``(0, p)`` and dilation ``(1, d)`` applied to the
    input viewed as ``(N, C, 1, L)``: its im2col matrix, bias row and weight
    layout ``(C_out, C_in/groups, k)`` are those of that ``Conv2d``, so every
    ``Conv2d`` route (fast paths, chunking) serves it unchanged.

    Attributes:
        kernel_size, stride, dilation: Per spatial dimension (height, width).
        padding: ``(height, width)`` or ``"same"``/``"valid"``.
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``.
        groups: Channel groups.
        reversed_padding: The padding in ``F.pad`` order, for non-zero modes.
    """

    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    padding: tuple[int, int] | str
    padding_mode: str
    groups: int
    reversed_padding: tuple[int, ...]

    @classmethod
    def of(cls, conv: nn.Conv1d | nn.Conv2d) -> ConvGeometry:
        """The geometry of an ``nn.Conv2d``, or of an ``nn.Conv1d`` as a unit-height
        ``nn.Conv2d``."""
        reversed_padding = tuple(conv._reversed_padding_repeated_twice)
        if isinstance(conv, nn.Conv2d):
            return cls(
                tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.dilation),
                conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
                conv.padding_mode, conv.groups, reversed_padding,
            )
        (k,), (s,), (d,) = conv.kernel_size, conv.stride, conv.dilation
        padding = conv.padding if isinstance(conv.padding, str) else (0, conv.padding[0])
        # F.pad lists the last dimension first: the width's pads, then none for the height.
        return cls((1, k), (1, s), (1, d), padding, conv.padding_mode, conv.groups, (*reversed_padding, 0, 0))


def _as_2d(t: Tensor, conv: nn.Module) -> Tensor:
    """A convolution's input or output gradient as a batched ``(N, C, H, W)`` tensor:
    an un-batched one gains the batch dimension, a ``Conv1d``'s ``(N, C, L)`` the
    unit height of :class:`ConvGeometry`."""
    spatial = len(conv.kernel_size)
    if t.ndim == spatial + 1:  # un-batched
        t = t.unsqueeze(0)
    return t.unsqueeze(2) if spatial == 1 else t


def _pad_like_conv(x: Tensor, conv: ConvGeometry) -> Tensor:
    """``x`` padded exactly as ``conv`` pads it (any mode, string paddings)."""
    if conv.padding_mode != "zeros":
        return F.pad(x, conv.reversed_padding, mode=conv.padding_mode)
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


def conv2d_input(x: Tensor, conv: ConvGeometry) -> Tensor:
    """The input as the kernel sees it: padded, and with channel groups averaged
    (grouped convolutions share one Kronecker factor across groups, as in the
    reference package). ``(N, C_in, H, W)`` → ``(N, C_in/groups, H', W')``."""
    if conv.groups > 1:
        x = x.unflatten(1, (conv.groups, -1)).mean(dim=1)
    return _pad_like_conv(x, conv)


def conv2d_patch_view(x: Tensor, conv: ConvGeometry) -> Tensor:
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


def _layout_rows(view: Tensor, feature_dims: int, has_bias: bool, row_major: bool = False) -> Tensor:
    """Copy a view of shape ``(*features, *rows)`` into a ``(d [+1], n)`` matrix,
    writing the bias's row of ones in the same pass: contiguous, or with
    ``row_major`` the transpose of a contiguous ``(n, d [+1])`` matrix."""
    features, rows = view.shape[:feature_dims], view.shape[feature_dims:]
    d = math.prod(features)
    if row_major:
        out = view.new_empty(*rows, d + int(has_bias))
        order = [*range(feature_dims, view.ndim), *range(feature_dims)]
        out[..., :d].view(*rows, *features).copy_(view.permute(order))
        if has_bias:
            out[..., d].fill_(1.0)
        return out.reshape(-1, d + int(has_bias)).mT
    out = view.new_empty(d + int(has_bias), *rows)
    out[:d].view(view.shape).copy_(view)
    if has_bias:
        out[d].fill_(1.0)
    return out.reshape(out.shape[0], -1)


def _conv_rows_row_major(
    pixels: Tensor, conv: ConvGeometry, out_size: tuple[int, int], start: int, stop: int, has_bias: bool
) -> Tensor:
    """The im2col columns of samples ``start … stop − 1`` as the transpose of a
    contiguous ``(n_i, d [+1])`` matrix (ones in the last column with a bias).

    One copy per kernel entry ``(i, j)`` of the pixels it meets, whole channel
    vectors at a time from the channels-last input: for kernels of up to 3×3, two
    to three times faster than one copy of the permuted patch view, whose innermost
    loop runs over the kernel's few columns (measured on CPU). Larger kernels make
    too many passes over the output, so they take the single copy.

    Args:
        pixels: The padded input, channels-last and contiguous, ``(N, H', W', c)``.
        conv: The layer (for its kernel size, stride and dilation).
        out_size: The output's spatial size ``(O1, O2)``.
    """
    (kernel_h, kernel_w), (stride_h, stride_w), (dilation_h, dilation_w) = conv.kernel_size, conv.stride, conv.dilation
    (out_h, out_w), channels = out_size, pixels.shape[-1]
    d = channels * kernel_h * kernel_w
    out = pixels.new_empty(stop - start, out_h, out_w, d + int(has_bias))
    kernel = out[..., :d].unflatten(-1, (channels, kernel_h, kernel_w))
    for i in range(kernel_h):
        rows = slice(i * dilation_h, i * dilation_h + stride_h * (out_h - 1) + 1, stride_h)
        for j in range(kernel_w):
            columns = slice(j * dilation_w, j * dilation_w + stride_w * (out_w - 1) + 1, stride_w)
            kernel[..., i, j] = pixels[start:stop, rows, columns]
    if has_bias:
        out[..., d].fill_(1.0)
    return out.flatten(0, 2).mT


def _conv_cross(x: Tensor, patches: Tensor, conv: ConvGeometry, has_bias: bool, index: Tensor) -> Tensor:
    """``X[index] Xᵀ`` for the im2col matrix ``X`` of a convolution, ``(k, d)``,
    without building ``X``.

    In the flattened channels-last input, the pixel that kernel entry ``(i, j)``
    meets in a window is the window's top-left pixel plus a fixed offset. So with
    the selected rows scattered onto the windows' top-left pixels (zeros
    elsewhere), the products with all rows of kernel entry ``(i, j)`` are one
    matrix product with a contiguous, shifted slice of the input: ``k1·k2``
    products and one copy of the input instead of an im2col copy ``k1·k2`` times
    its size.

    Args:
        x: The padded input, ``(N, c, H', W')`` (see :func:`conv2d_input`).
        patches: Its :func:`conv2d_patch_view`, ``(c, k1, k2, N, O1, O2)``.
        conv: The layer (for its stride and dilation).
        has_bias: Whether ``X`` has a last row of ones.
        index: ``(k,)`` row indices of ``X`` (``d − 1`` is the ones row with a bias).
    """
    batch, channels, height, width = x.shape
    kernel_h, kernel_w = conv.kernel_size
    (stride_h, stride_w), (dilation_h, dilation_w) = conv.stride, conv.dilation
    out_h, out_w = patches.shape[4], patches.shape[5]
    d_w = channels * kernel_h * kernel_w
    index = index.to(x.device)
    feature = index.clamp(max=d_w - 1)
    # (k, N, O1, O2): the selected rows only (flattening the view would copy it all).
    selected = patches[feature // (kernel_h * kernel_w), feature // kernel_w % kernel_h, feature % kernel_w]
    selected[index >= d_w] = 1.0  # the ones row
    corners = x.new_zeros(len(index), batch, height, width)
    corners[:, :, : out_h * stride_h : stride_h, : out_w * stride_w : stride_w] = selected
    corners = corners.flatten(1)  # (k, M), M = N·H'·W'
    pixels = x.permute(0, 2, 3, 1).reshape(-1, channels)  # (M, c), channels-last copy
    total = pixels.shape[0]
    products = x.new_empty(len(index), channels, kernel_h, kernel_w)
    for i in range(kernel_h):
        for j in range(kernel_w):
            # Windows stay inside the image, so non-zero corners never run past M.
            offset = i * dilation_h * width + j * dilation_w
            products[:, :, i, j] = corners[:, : total - offset] @ pixels[offset:]
    products = products.flatten(1)  # (k, d_w)
    if has_bias:  # the ones row's column: the selected rows' sums
        products = torch.cat([products, selected.sum(dim=(1, 2, 3)).unsqueeze(1)], dim=1)
    return products


def _linear_gram(flat: Tensor, has_bias: bool) -> Tensor:
    """``X Xᵀ`` for ``X = [flatᵀ; 1ᵀ]`` (without the ones row if no bias), straight
    from the ``(n, d)`` input: no copy with the ones row appended."""
    gram = symmetric_matmul(flat.T, flat)
    if not has_bias:
        return gram
    sums = _sum_over_chunks(flat, lambda b: b.sum(dim=0))
    corner = sums.new_full((1,), flat.shape[0])
    return torch.cat([torch.cat([gram, sums.unsqueeze(1)], dim=1), torch.cat([sums, corner]).unsqueeze(0)])


def _linear_cross(flat: Tensor, has_bias: bool, index: Tensor) -> Tensor:
    """``X[index] Xᵀ`` for ``X = [flatᵀ; 1ᵀ]`` (see :func:`_linear_gram`), ``(k, d)``."""
    d = flat.shape[1]
    index = index.to(flat.device)
    selected = flat.index_select(1, index.clamp(max=d - 1))  # (n, k)
    if has_bias:
        selected[:, index >= d] = 1.0  # the ones row
    products = selected.T @ flat
    if has_bias:
        products = torch.cat([products, selected.sum(dim=0).unsqueeze(1)], dim=1)
    return products


def _sample_cross(t: Tensor, has_bias: bool, index: Tensor) -> Tensor:
    """``X[index] Xᵀ``, ``(k, C [+1])``, for ``X`` with one column per sample and
    location of ``t`` (``(N, C, L)``; plus a last row of ones with ``has_bias``):
    per-sample products summed over the batch, without the ``(C, N·L)`` copy."""
    channels = t.shape[1]
    index = index.to(t.device)
    is_ones = index >= channels

    def products(chunk: Tensor) -> Tensor:
        selected = chunk[:, index.clamp(max=channels - 1)]  # (n, k, L)
        selected[:, is_ones] = 1.0
        out = (selected @ chunk.mT).sum(dim=0)
        if has_bias:
            out = torch.cat([out, selected.sum(dim=(0, 2)).unsqueeze(1)], dim=1)
        return out

    return _sum_over_chunks(t, products)


def _conv_cross_function(x: Tensor, patches: Tensor, conv: ConvGeometry, has_bias: bool) -> Callable | None:
    """The fastest way to ``X[index] Xᵀ`` for a convolution's im2col ``X``, if any
    beats building ``X``: a pointwise convolution's ``X`` is the input itself."""
    if patches.shape[1:3] == (1, 1) and patches.shape[4:] == x.shape[2:]:  # 1×1, stride 1
        return lambda index: _sample_cross(x.flatten(2), has_bias, index)
    if patches.shape[0] >= 32:  # few channels make the shifted products narrow
        return partial(_conv_cross, x, patches, conv, has_bias)
    return None


def _embedding_rows(x: Tensor, num_embeddings: int, approx: str, dtype: torch.dtype) -> Rows:
    """``Aᵀ`` of an embedding's token ids ``x`` as :class:`Rows`, ``(V, n)``, from the
    token counts: the one-hot columns are never built.

    With ``"expand"`` (or ids without a sequence dimension) ``A Aᵀ = diag(c)``, ``c`` the counts, and
    ``X = diag(√c)`` has that Gram matrix with ``V`` columns instead of ``n``: its
    builds, for structures that need them, cost ``V`` columns, however many tokens.
    ``Rows.n`` stays the number of tokens. With ``"reduce"`` a row of ``A`` is a
    sample's mean one-hot vector, its counts over the length: ``(N, V)`` rows.
    """
    if approx == "reduce" and x.ndim > 1:
        ids = x.reshape(x.shape[0], -1)
        means = torch.zeros(ids.shape[0], num_embeddings, dtype=dtype, device=x.device)
        means.scatter_add_(1, ids, torch.full(ids.shape, 1.0 / ids.shape[1], dtype=dtype, device=x.device))
        return _linear_rows(means, False)
    ids = x.reshape(-1)
    exact = torch.bincount(ids, minlength=num_embeddings).to(torch.promote_types(dtype, torch.float32))
    counts = exact.to(dtype)
    roots: list[Tensor] = []  # √c, made once if a build needs it

    def build(start: int, stop: int, row_major: bool) -> Tensor:
        if not roots:  # from float32 counts: float16 holds √c of counts beyond its range
            roots.append(exact.sqrt().to(dtype))
        out = counts.new_zeros(num_embeddings, stop - start)
        out[start:stop].diagonal().copy_(roots[0][start:stop])
        return out

    def cross(index: Tensor) -> Tensor:
        index = index.to(x.device)
        out = counts.new_zeros(len(index), num_embeddings)
        out[torch.arange(len(index), device=x.device), index] = counts[index]
        return out

    rows = Rows(build, num_embeddings, num_embeddings, 1, dtype, lambda: counts.clone(), cross=cross,
                gram=lambda: torch.diag(counts))
    rows.n = ids.numel()
    return rows


def _linear_rows(flat: Tensor, has_bias: bool) -> Rows:
    """``Aᵀ`` of a linear layer's ``(n, d)`` inputs as :class:`Rows` (a last row of
    ones with ``has_bias``)."""
    n, d = flat.shape
    d_k = d + int(has_bias)

    def square_sums() -> Tensor:
        sums = _square_sums(flat, 0)
        return torch.cat([sums, sums.new_full((1,), n)]) if has_bias else sums

    products = dict(cross=partial(_linear_cross, flat, has_bias), gram=partial(_linear_gram, flat, has_bias))
    if not has_bias:
        return Rows(lambda start, stop, _: flat[start:stop].T, d_k, n, 1, flat.dtype, square_sums, copies=False, **products)
    # Rows of the input are contiguous: the row-major copy is the fast one.
    return Rows(
        lambda start, stop, _: _layout_rows(flat[start:stop].T, 1, True, row_major=True),
        d_k, n, 1, flat.dtype, square_sums, **products,
    )


def input_rows(layer: KroneckerLayer, x: Tensor, approx: str, dtype: torch.dtype | None = None) -> Rows:
    """``Aᵀ`` (un-normalised) as :class:`Rows`: ``(d_K, n)``; the last row is ones
    when the layer has a bias. Each chunk is built in a single copy.

    ``dtype``: of the rows (default: ``x``'s; an embedding's token ids are integers,
    its rows the factor's dtype, by default float32)."""
    module, has_bias = layer.module, layer.has_bias
    d_k = layer.dim_in
    if isinstance(module, nn.Embedding):
        return _embedding_rows(x, d_k, approx, dtype or torch.get_default_dtype())
    if dtype is not None:
        x = x.to(dtype)
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        x, module = _as_2d(x, module), ConvGeometry.of(module)
        x = conv2d_input(x, module)
        patches = conv2d_patch_view(x, module)  # (c, k1, k2, N, O1, O2)
        batch, locations = patches.shape[3], patches.shape[4] * patches.shape[5]
        if approx == "expand":
            n = batch * locations

            def square_sums() -> Tensor:
                # Squares of the padded input summed over the batch, then over the
                # same strided windows.
                squares = _square_sums(x, 0, keepdim=True)
                sums = conv2d_patch_view(squares, module).sum(dim=(3, 4, 5)).flatten()
                return torch.cat([sums, sums.new_full((1,), n)]) if has_bias else sums

            channels_last: list[Tensor] = []  # the padded input, channels-last, made once

            def build(start: int, stop: int, row_major: bool) -> Tensor:
                if not row_major or module.kernel_size[0] * module.kernel_size[1] > 9:
                    return _layout_rows(patches[:, :, :, start:stop], 3, has_bias, row_major)
                if not channels_last:
                    channels_last.append(x.permute(0, 2, 3, 1).contiguous())
                return _conv_rows_row_major(channels_last[0], module, patches.shape[4:], start, stop, has_bias)

            return Rows(
                build, d_k, batch, locations, x.dtype, square_sums,
                # Few channels make the shifted products narrow (and im2col small).
                cross=_conv_cross_function(x, patches, module, has_bias),
            )
        mean = patches.mean(dim=(4, 5)).flatten(0, 2)  # (d, N): no im2col copy
        return Rows(
            lambda start, stop, row_major: _layout_rows(mean[:, start:stop], 1, has_bias, row_major),
            d_k, batch, 1, x.dtype,
        )
    d = x.shape[-1]
    flat = x.reshape(-1, d)
    if approx == "reduce" and x.ndim > 2:
        flat = x.reshape(x.shape[0], -1, d).mean(dim=1)
    return _linear_rows(flat, has_bias)


def output_gradient_rows(
    layer: KroneckerLayer, g: Tensor, approx: str, loss_average: str | None
) -> tuple[Rows, int]:
    """``Gᵀ`` (un-scaled) as :class:`Rows`, ``(d_o, n')``, and the number ``N`` of
    loss terms the output gradient averages over."""
    module, d_o = layer.module, layer.dim_out
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        g = _as_2d(g, module)
        batch, shared = g.shape[0], g.shape[2:].numel()
        if approx == "expand":

            def build(start: int, stop: int, row_major: bool) -> Tensor:
                if row_major:
                    # (reshape would return a column-major view for a single sample)
                    return g[start:stop].permute(0, 2, 3, 1).contiguous().reshape(-1, d_o).mT
                return g[start:stop].transpose(0, 1).reshape(d_o, -1)

            rows = Rows(
                build, d_o, batch, shared, g.dtype, lambda: _square_sums(g, (0, 2, 3)),
                cross=lambda index: _sample_cross(g.flatten(2), False, index),
            )
        else:
            summed = g.sum(dim=(2, 3))
            rows = Rows(lambda start, stop, _: summed[start:stop].T, d_o, batch, 1, g.dtype, copies=False)
    else:
        if g.ndim <= 1:
            g = g.unsqueeze(0)
        batch, shared = g.shape[0], g.shape[1:-1].numel()
        flat = g.reshape(-1, d_o) if approx == "expand" or g.ndim == 2 else g.reshape(batch, -1, d_o).sum(dim=1)
        rows = Rows(
            lambda start, stop, _: flat[start:stop].T, d_o, flat.shape[0], 1, g.dtype,
            lambda: _square_sums(flat, 0), copies=False,
            cross=partial(_linear_cross, flat, False), gram=partial(_linear_gram, flat, False),
        )
    if loss_average is None:
        num_terms = 1
    elif loss_average == "batch":
        num_terms = batch
    else:
        num_terms = batch * shared
    return rows, num_terms


def input_matrix(layer: KroneckerLayer, x: Tensor, approx: str) -> tuple[Tensor, int]:
    """``Aᵀ`` (un-normalised), ``(d_K, n)``, and its number of rows ``n`` (for an
    embedding: ``diag(√counts)``, ``(V, V)``, with the same ``A Aᵀ``)."""
    rows = input_rows(layer, x, approx)
    return rows.matrix(), rows.n


def output_gradient_matrix(
    layer: KroneckerLayer, g: Tensor, approx: str, loss_average: str | None
) -> tuple[Tensor, int]:
    """``Gᵀ`` (un-scaled), ``(d_o, n')``, and the number ``N`` of loss terms."""
    rows, num_terms = output_gradient_rows(layer, g, approx, loss_average)
    return rows.matrix(), num_terms


# ------------------------------------------------------------------ collector
# Collectors by layer key, for the opaque op of compiled models (weak: a dropped
# optimizer's layers are forgotten).
_COLLECTORS: weakref.WeakValueDictionary[int, CurvatureCollector] = weakref.WeakValueDictionary()
_KEYS = itertools.count()


@torch.library.custom_op("singd_lightning::curvature_grad", mutates_args=())
def _curvature_grad(grad_output: Tensor, x: Tensor, key: int) -> Tensor:
    """Hand a layer's input and output gradient to its collector; pass the
    gradient on. An op the compiler cannot see into, so that the statistics of a
    compiled model run eagerly, exactly as in eager mode, inside one backward graph."""
    collector = _COLLECTORS.get(key)
    if collector is not None:
        collector._compiled_backward(key, x, grad_output)
    return grad_output.clone()  # an op's output must not alias its input


@_curvature_grad.register_fake
def _(grad_output: Tensor, x: Tensor, key: int) -> Tensor:
    return torch.empty_like(grad_output)


class _CaptureOutputGradient(torch.autograd.Function):
    """Identity on a layer's output whose backward calls :func:`_curvature_grad`."""

    @staticmethod
    def forward(output: Tensor, x: Tensor, key: int) -> Tensor:
        return output.view_as(output)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: Tensor) -> None:
        ctx.save_for_backward(inputs[1])
        ctx.key = inputs[2]

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None, None]:
        (x,) = ctx.saved_tensors
        return torch.ops.singd_lightning.curvature_grad(grad_output, x, ctx.key), None, None


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
        self._layer_of_key: dict[int, KroneckerLayer] = {}
        self.enabled = True
        for layer in layers:
            key = next(_KEYS)
            _COLLECTORS[key] = self
            self._layer_of_key[key] = layer
            layer.handles.append(
                layer.module.register_forward_hook(partial(self._forward_hook, layer, key))
            )

    def _forward_hook(self, layer: KroneckerLayer, key: int, module: nn.Module, args, output) -> Tensor | None:
        if not (self.enabled and torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad):
            return None
        if torch.compiler.is_compiling():
            # A tensor hook would break the graph at every layer, and reading the
            # step count would guard on it (a recompile per step): route the output
            # gradient through an op the compiler keeps opaque, which decides at
            # backward time whether this step collects.
            return _CaptureOutputGradient.apply(output, args[0].detach(), key)
        if self.is_collecting(layer):
            # The input is kept alive by autograd for the weight gradient anyway.
            output.register_hook(partial(self._backward_hook, layer, args[0].detach()))
        return None

    def _compiled_backward(self, key: int, x: Tensor, grad_output: Tensor) -> None:
        """The backward hook of a compiled forward pass (see :func:`_curvature_grad`)."""
        layer = self._layer_of_key[key]
        if self.enabled and self.is_collecting(layer):
            self._backward_hook(layer, x, grad_output)

    @torch.no_grad()
    def _backward_hook(self, layer: KroneckerLayer, x: Tensor, grad_output: Tensor) -> None:
        group = layer.group
        approx, loss_average = group["kfac_approx"], group["loss_average"]
        dtype_k, dtype_c = self.dtypes(layer)
        scale = self.grad_scale()
        with torch.autocast(device_type=x.device.type, enabled=False):
            x_in = input_rows(layer, x, approx, dtype_k)
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
