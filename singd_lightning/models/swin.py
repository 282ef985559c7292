"""Swin Transformer for small images.

Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted
Windows" (ICCV 2021). Self-attention is restricted to non-overlapping windows;
every second block shifts the windows by half a window (a cyclic roll plus an
attention mask) so that information crosses window borders. Each window head
adds a learned relative position bias. Patch-merging layers halve the token grid
and double the width between stages.

The small-image configuration follows the CIFAR Swin of Lee et al., "Vision
Transformer for Small-Size Datasets" (2021): patch size 2, window size 4. All
projections are ``nn.Linear`` (the patch embedding an ``nn.Conv2d``) so that a
Kronecker-factored optimizer covers every weight matrix. Tokens are kept as
``(B, H, W, C)`` maps. Grids that are not a multiple of the window size are
zero-padded at the bottom/right, so any input size works.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from singd_lightning.models._layers import DropPath, Mlp, init_transformer_weights, linear_schedule


def window_partition(x: Tensor, window_size: int) -> Tensor:
    """Split ``(B, H, W, C)`` into windows ``(B * nW, window_size**2, C)``."""
    B, H, W, C = x.shape
    x = x.view(B, H // window_size, window_size, W // window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size * window_size, C)


def window_reverse(windows: Tensor, window_size: int, H: int, W: int) -> Tensor:
    """Inverse of :func:`window_partition`: back to ``(B, H, W, C)``."""
    C = windows.shape[-1]
    x = windows.view(-1, H // window_size, W // window_size, window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


def relative_position_index(window_size: int) -> Tensor:
    """Index into the ``(2w-1)**2`` bias table for every (query, key) pair of a window."""
    coords = torch.stack(
        torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
    ).flatten(1)  # (2, w*w)
    rel = coords[:, :, None] - coords[:, None, :] + (window_size - 1)  # (2, N, N), >= 0
    return rel[0] * (2 * window_size - 1) + rel[1]


def shifted_window_mask(H: int, W: int, window_size: int, shift: int, device=None) -> Tensor:
    """Additive attention mask ``(nW, N, N)`` for shifted windows.

    After the cyclic roll, a window can hold tokens from up to four image regions
    that are not neighbours; pairs from different regions get ``-inf``-like scores.
    """
    region = torch.zeros(1, H, W, 1, device=device)
    label = 0
    bounds = (slice(0, -window_size), slice(-window_size, -shift), slice(-shift, None))
    for hs in bounds:
        for ws in bounds:
            region[:, hs, ws, :] = label
            label += 1
    ids = window_partition(region, window_size).squeeze(-1)  # (nW, N)
    diff = ids[:, None, :] - ids[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with relative position bias.

    Args:
        dim: Token width.
        window_size: Side length of a square window.
        num_heads: Number of heads; must divide ``dim``.
        qkv_bias: Bias in the fused query/key/value projection.
        attn_drop: Dropout on the attention weights.
        proj_drop: Dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        window_size: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.window_size = window_size
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads)
        )
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer(
            "relative_position_index", relative_position_index(window_size), persistent=False
        )
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Attend within windows.

        Args:
            x: Windows, shape ``(B * nW, N, C)`` with ``N = window_size**2``.
            mask: Additive mask ``(nW, N, N)`` for shifted windows, or ``None``.
        """
        Bw, N, C = x.shape
        qkv = self.qkv(x).reshape(Bw, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (Bw, heads, N, head_dim)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(N, N, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(Bw // nW, nW, self.num_heads, N, N) + mask[None, :, None]
            attn = attn.view(Bw, self.num_heads, N, N)
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(Bw, N, C)
        return self.proj_drop(self.proj(x))


class SwinBlock(nn.Module):
    """Swin block: (shifted-)window attention and MLP, both pre-norm residual.

    Args:
        dim: Token width.
        num_heads: Attention heads.
        window_size: Window side length.
        shift: Use shifted windows (shift by ``window_size // 2``). Ignored when
            the grid fits in a single window.
        mlp_ratio: MLP hidden width relative to ``dim``.
        qkv_bias: Bias in the query/key/value projection.
        drop: Dropout after attention and in the MLP.
        attn_drop: Dropout on the attention weights.
        drop_path: Stochastic-depth probability of both residual branches.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 4,
        shift: bool = False,
        mlp_ratio: float = 2.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2 if shift else 0
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(
            dim, window_size, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop
        )
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def _attend(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        ws = self.window_size
        pad_h, pad_w = (-H) % ws, (-W) % ws
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        Hp, Wp = H + pad_h, W + pad_w
        shift = self.shift_size if (Hp > ws or Wp > ws) else 0
        mask = None
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
            mask = shifted_window_mask(Hp, Wp, ws, shift, device=x.device).to(x.dtype)
        x = window_reverse(self.attn(window_partition(x, ws), mask), ws, Hp, Wp)
        if shift:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        return x[:, :H, :W, :]

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self._attend(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Concatenate 2×2 neighbours, LayerNorm, and project ``4C -> 2C``.

    Args:
        dim: Input token width ``C``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[1:3]
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat(
            [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1
        )
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """Blocks at one resolution (alternating regular/shifted windows), then an
    optional patch merging.

    Args:
        dim: Token width of the stage.
        depth: Number of blocks.
        num_heads: Attention heads.
        window_size: Window side length.
        mlp_ratio: MLP hidden width relative to ``dim``.
        qkv_bias: Bias in the query/key/value projections.
        drop: Dropout after attention and in the MLPs.
        attn_drop: Dropout on the attention weights.
        drop_path: Per-block stochastic-depth probabilities (length ``depth``).
        downsample: Append a :class:`PatchMerging`.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop: float,
        attn_drop: float,
        drop_path: Sequence[float],
        downsample: bool,
    ) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *[
                SwinBlock(
                    dim,
                    num_heads,
                    window_size=window_size,
                    shift=i % 2 == 1,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop=drop,
                    attn_drop=attn_drop,
                    drop_path=drop_path[i],
                )
                for i in range(depth)
            ]
        )
        self.downsample = PatchMerging(dim) if downsample else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.downsample(self.blocks(x))


class SwinTransformer(nn.Module):
    """Swin Transformer classifier.

    Args:
        img_size: Nominal input size; a stage whose token grid at this size is
            smaller than ``window_size`` uses a window equal to its grid instead.
        patch_size: Patch embedding kernel size and stride.
        num_classes: Number of output logits.
        in_chans: Input image channels.
        embed_dim: Width of the first stage; doubled by every patch merging.
        depths: Blocks per stage.
        num_heads: Attention heads per stage.
        window_size: Window side length.
        mlp_ratio: MLP hidden width relative to the stage width.
        qkv_bias: Bias in the query/key/value projections.
        drop_rate: Dropout on embeddings, after attention and in the MLPs.
        attn_drop_rate: Dropout on the attention weights.
        drop_path_rate: Stochastic depth, increasing linearly to this value
            over all blocks.
    """

    def __init__(
        self,
        img_size: int = 32,
        patch_size: int = 2,
        num_classes: int = 100,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 6, 4),
        num_heads: Sequence[int] = (3, 6, 12),
        window_size: int = 4,
        mlp_ratio: float = 2.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
    ) -> None:
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError("depths and num_heads must have the same length")
        self.num_classes = num_classes
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.patch_norm = nn.LayerNorm(embed_dim)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = linear_schedule(drop_path_rate, sum(depths))
        grid = max(img_size // patch_size, 1)
        stages = []
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            stages.append(
                SwinStage(
                    embed_dim * 2**i,
                    depth,
                    heads,
                    window_size=min(window_size, grid),
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=rates[sum(depths[:i]) : sum(depths[: i + 1])],
                    downsample=i < len(depths) - 1,
                )
            )
            grid = max((grid + 1) // 2, 1)
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes)
        self.apply(init_transformer_weights)

    def forward_features(self, x: Tensor) -> Tensor:
        """Average-pooled final tokens, shape ``(B, num_features)``."""
        x = self.patch_embed(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        x = self.stages(self.pos_drop(self.patch_norm(x)))
        return self.norm(x).mean(dim=(1, 2))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


def swin_tiny_32(num_classes: int = 100, in_chans: int = 3, **kwargs) -> SwinTransformer:
    """Small Swin for 32 px images (the CIFAR setting, ≈7.1M parameters).

    Patch 2, window 4, width 96, depths (2, 6, 4), heads (3, 6, 12), MLP ratio 2:
    token grids 16×16, 8×8 and 4×4.
    """
    cfg = dict(
        img_size=32, patch_size=2, embed_dim=96, depths=(2, 6, 4), num_heads=(3, 6, 12),
        window_size=4, mlp_ratio=2.0,
    )  # fmt: skip
    return SwinTransformer(num_classes=num_classes, in_chans=in_chans, **{**cfg, **kwargs})


def swin_tiny_128(num_classes: int = 10, in_chans: int = 3, **kwargs) -> SwinTransformer:
    """Small Swin for 128 px ImageWoof (≈7.1M parameters).

    The :func:`swin_tiny_32` stages behind a patch-8 embedding, so the token grids
    (16×16, 8×8, 4×4) match the CIFAR model's and windows of 4 tile them exactly.
    """
    cfg = dict(
        img_size=128, patch_size=8, embed_dim=96, depths=(2, 6, 4), num_heads=(3, 6, 12),
        window_size=4, mlp_ratio=2.0,
    )  # fmt: skip
    return SwinTransformer(num_classes=num_classes, in_chans=in_chans, **{**cfg, **kwargs})


def swin_tiny_160(num_classes: int = 10, in_chans: int = 3, **kwargs) -> SwinTransformer:
    """Small Swin for 160 px ImageWoof (≈7.1M parameters).

    As :func:`swin_tiny_128` with windows of 5, which tile the 20×20, 10×10 and
    5×5 token grids exactly.
    """
    cfg = dict(
        img_size=160, patch_size=8, embed_dim=96, depths=(2, 6, 4), num_heads=(3, 6, 12),
        window_size=5, mlp_ratio=2.0,
    )  # fmt: skip
    return SwinTransformer(num_classes=num_classes, in_chans=in_chans, **{**cfg, **kwargs})


def swin_nano(num_classes: int = 10, in_chans: int = 3, **kwargs) -> SwinTransformer:
    """Two-stage, width-16 Swin for 32 px inputs (8×8 then 4×4 tokens), for fast tests."""
    cfg = dict(
        img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
        window_size=4, mlp_ratio=2.0,
    )  # fmt: skip
    return SwinTransformer(num_classes=num_classes, in_chans=in_chans, **{**cfg, **kwargs})


__all__ = [
    "PatchMerging",
    "SwinBlock",
    "SwinStage",
    "SwinTransformer",
    "WindowAttention",
    "relative_position_index",
    "shifted_window_mask",
    "swin_nano",
    "swin_tiny_128",
    "swin_tiny_160",
    "swin_tiny_32",
    "window_partition",
    "window_reverse",
]
