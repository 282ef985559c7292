"""Compact Convolutional Transformer (CCT).

Hassani et al., "Escaping the Big Data Paradigm with Compact Transformers"
(2021): a small convolutional tokenizer replaces ViT's patch embedding, a
pre-norm transformer encoder processes the tokens, and *sequence pooling* (a
learned softmax-weighted average of the tokens) replaces the class token.
``CCT-L/KxN`` has ``L`` encoder layers and ``N`` tokenizer convolutions of kernel
size ``K``. This is the "Compact-ViT" of the SINGD comparisons.

Attention is written with ``nn.Linear`` layers for the query/key/value and output
projections (not ``nn.MultiheadAttention``) so that a Kronecker-factored
optimizer that handles ``nn.Linear``/``nn.Conv2d`` covers every weight matrix.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from singd_lightning.models._layers import DropPath, Mlp, init_transformer_weights, linear_schedule

PosEmbed = Literal["learnable", "sine", "none"]


class ConvTokenizer(nn.Module):
    """Stack of ``Conv2d -> ReLU -> MaxPool`` turning an image into tokens.

    Args:
        in_chans: Input image channels.
        embed_dim: Channels of the last convolution (the token width).
        kernel_size: Kernel size of every convolution.
        stride: Stride of every convolution.
        padding: Padding of every convolution.
        n_conv_layers: Number of convolutions.
        mid_chans: Channels of the intermediate convolutions.
        pool: Apply a 3×3, stride-2 max-pool after each convolution.
    """

    def __init__(
        self,
        in_chans: int,
        embed_dim: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        n_conv_layers: int = 1,
        mid_chans: int = 64,
        pool: bool = True,
    ) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.n_conv_layers, self.pool = n_conv_layers, pool
        chans = [in_chans] + [mid_chans] * (n_conv_layers - 1) + [embed_dim]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [
                nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False),
                nn.ReLU(inplace=True),
            ]
            if pool:
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.layers = nn.Sequential(*layers)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Token grid ``(H, W)`` produced for a ``height × width`` input."""

        def out(n: int) -> int:
            for _ in range(self.n_conv_layers):
                n = (n + 2 * self.padding - self.kernel_size) // self.stride + 1
                if self.pool:
                    n = (n + 2 - 3) // 2 + 1
            return n

        return out(height), out(width)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Return tokens ``(B, H*W, C)`` and the token grid ``(H, W)``."""
        x = self.layers(x)
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid


class Attention(nn.Module):
    """Multi-head self-attention with ``nn.Linear`` projections.

    Args:
        dim: Token width.
        num_heads: Number of heads; must divide ``dim``.
        qkv_bias: Bias in the fused query/key/value projection.
        attn_drop: Dropout on the attention weights.
        proj_drop: Dropout after the output projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        x = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0.0
        )
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: ``x + MHSA(LN(x))`` then ``x + MLP(LN(x))``.

    Args:
        dim: Token width.
        num_heads: Attention heads.
        mlp_ratio: MLP hidden width relative to ``dim``.
        drop: Dropout after the attention projection and in the MLP.
        attn_drop: Dropout on the attention weights.
        drop_path: Stochastic-depth probability of both residual branches.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 2.0,
        drop: float = 0.0,
        attn_drop: float = 0.1,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SeqPool(nn.Module):
    """Sequence pooling: softmax-weighted token average with learned weights.

    Args:
        dim: Token width.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attention = nn.Linear(dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        weights = self.attention(x).softmax(dim=1)  # (B, N, 1)
        return (weights.transpose(1, 2) @ x).squeeze(1)


def sinusoidal_embedding(num_tokens: int, dim: int) -> Tensor:
    """1-D sine/cosine position table of shape ``(1, num_tokens, dim)``."""
    position = torch.arange(num_tokens, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(num_tokens, dim)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: dim // 2])
    return table[None]


class CCT(nn.Module):
    """Compact Convolutional Transformer classifier.

    The positional embedding is sized for ``img_size``; other input sizes work
    too, the table is then bicubically resized to the new token grid.

    Args:
        img_size: Input resolution the positional embedding is built for.
        num_classes: Number of output logits.
        in_chans: Input image channels.
        embed_dim: Token width.
        depth: Number of encoder blocks.
        num_heads: Attention heads per block.
        mlp_ratio: MLP hidden width relative to ``embed_dim``.
        kernel_size: Tokenizer convolution kernel size.
        stride: Tokenizer convolution stride.
        padding: Tokenizer convolution padding.
        n_conv_layers: Number of tokenizer convolutions.
        tokenizer_chans: Channels of intermediate tokenizer convolutions.
        positional_embedding: ``"learnable"`` (trained ``nn.Parameter``),
            ``"sine"`` (fixed ``nn.Parameter`` with ``requires_grad=False``) or
            ``"none"``.
        drop_rate: Dropout on embeddings, after attention and in the MLPs.
        attn_drop_rate: Dropout on the attention weights.
        drop_path_rate: Stochastic depth, increasing linearly to this value
            over the blocks.
    """

    def __init__(
        self,
        img_size: int = 32,
        num_classes: int = 100,
        in_chans: int = 3,
        embed_dim: int = 256,
        depth: int = 7,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        n_conv_layers: int = 1,
        tokenizer_chans: int = 64,
        positional_embedding: PosEmbed = "learnable",
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.1,
        drop_path_rate: float = 0.1,
    ) -> None:
        super().__init__()
        if positional_embedding not in ("learnable", "sine", "none"):
            raise ValueError(
                f"positional_embedding must be 'learnable', 'sine' or 'none', "
                f"got {positional_embedding!r}"
            )
        self.num_classes = num_classes
        self.num_features = embed_dim
        self.img_size = img_size
        self.tokenizer = ConvTokenizer(
            in_chans,
            embed_dim,
            kernel_size=kernel_size,
            stride=stride,
            padding=padding,
            n_conv_layers=n_conv_layers,
            mid_chans=tokenizer_chans,
        )
        self.grid_size = self.tokenizer.grid_size(img_size, img_size)
        num_tokens = self.grid_size[0] * self.grid_size[1]
        if positional_embedding == "learnable":
            self.pos_embed: nn.Parameter | None = nn.Parameter(
                torch.zeros(1, num_tokens, embed_dim)
            )
            nn.init.trunc_normal_(self.pos_embed, std=0.2)
        elif positional_embedding == "sine":
            self.pos_embed = nn.Parameter(
                sinusoidal_embedding(num_tokens, embed_dim), requires_grad=False
            )
        else:
            self.pos_embed = None
        self.pos_drop = nn.Dropout(drop_rate)
        rates = linear_schedule(drop_path_rate, depth)
        self.blocks = nn.Sequential(
            *[
                EncoderBlock(
                    embed_dim,
                    num_heads,
                    mlp_ratio=mlp_ratio,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=rate,
                )
                for rate in rates
            ]
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.pool = SeqPool(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        self.apply(init_transformer_weights)

    def _pos_embed(self, grid: tuple[int, int]) -> Tensor | None:
        if self.pos_embed is None or grid == self.grid_size:
            return self.pos_embed
        table = self.pos_embed.reshape(1, *self.grid_size, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=grid, mode="bicubic", align_corners=False)
        return table.flatten(2).transpose(1, 2)

    def forward_features(self, x: Tensor) -> Tensor:
        """Sequence-pooled features, shape ``(B, embed_dim)``."""
        x, grid = self.tokenizer(x)
        pos = self._pos_embed(grid)
        if pos is not None:
            x = x + pos
        x = self.blocks(self.pos_drop(x))
        return self.pool(self.norm(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


def cct_7_3x1_32(num_classes: int = 100, in_chans: int = 3, **kwargs) -> CCT:
    """CCT-7/3x1 for 32 px images (the CIFAR setting, ≈3.8M parameters).

    7 blocks, width 256, 4 heads, MLP ratio 2; one 3×3 tokenizer convolution and
    a max-pool give a 16×16 token grid.
    """
    cfg = dict(
        img_size=32, embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0,
        kernel_size=3, stride=1, padding=1, n_conv_layers=1,
    )  # fmt: skip
    return CCT(num_classes=num_classes, in_chans=in_chans, **{**cfg, **kwargs})


def _cct_7_7x2(img_size: int, num_classes: int, in_chans: int, **kwargs) -> CCT:
    cfg = dict(
        img_size=img_size, embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0,
        kernel_size=7, stride=2, padding=3, n_conv_layers=2,
    )  # fmt: skip
    return CCT(num_classes=num_classes, in_chans=in_chans, **{**cfg, **kwargs})


def cct_7_7x2_128(num_classes: int = 10, in_chans: int = 3, **kwargs) -> CCT:
    """CCT-7/7x2 for 128 px ImageWoof (≈4.5M parameters).

    Same encoder as :func:`cct_7_3x1_32`; the tokenizer has two 7×7, stride-2
    convolutions (64 then 256 channels), each followed by a stride-2 max-pool, as
    in the paper's 224 px CCT-14/7x2. The 16× down-sampling gives an 8×8 grid at
    128 px.
    """
    return _cct_7_7x2(128, num_classes, in_chans, **kwargs)


def cct_7_7x2_160(num_classes: int = 10, in_chans: int = 3, **kwargs) -> CCT:
    """CCT-7/7x2 for 160 px ImageWoof: as :func:`cct_7_7x2_128`, 10×10 tokens."""
    return _cct_7_7x2(160, num_classes, in_chans, **kwargs)


def cct_tiny(num_classes: int = 10, in_chans: int = 3, **kwargs) -> CCT:
    """Two-block, width-32 CCT for 32 px inputs (8×8 tokens), for fast tests."""
    cfg = dict(
        img_size=32, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
        kernel_size=3, stride=2, padding=1, n_conv_layers=1,
    )  # fmt: skip
    return CCT(num_classes=num_classes, in_chans=in_chans, **{**cfg, **kwargs})


__all__ = [
    "CCT",
    "Attention",
    "ConvTokenizer",
    "EncoderBlock",
    "SeqPool",
    "cct_7_3x1_32",
    "cct_7_7x2_128",
    "cct_7_7x2_160",
    "cct_tiny",
    "sinusoidal_embedding",
]
