"""HDVT: the hybrid vision transformer for small data sets of Lu et al.,
"Bridging the Gap Between Vision Transformers and Convolutional Neural Networks on
Small Datasets" (NeurIPS 2022), which the paper calls DHVT.

What follows the paper:

- **SOPE** (sequential overlapping patch embedding): a learned per-channel affine
  map of the image, then ``log2(patch_size)`` 3×3 stride-2 convolutions with
  BatchNorm (GELU between them; widths double up to ``embed_dim``), then a
  per-channel affine map of the tokens. There is no positional embedding: the
  overlapping stem and the depthwise convolutions in every block give positions.
- **HI-MHSA** (head-interacting multi-head self-attention): the tokens' channels
  are cut into one segment per head; each segment, averaged over all tokens, is
  projected to a full-width *head token* (Linear, LayerNorm, GELU, plus a learned
  embedding per head). The head tokens join the sequence for ordinary multi-head
  attention; afterwards their mean is added to the class token and they are
  dropped.
- **DAFF** (dynamic aggregation feed-forward): the patch tokens, as a feature map,
  go through a pointwise expansion, a 3×3 depthwise convolution with a shortcut and
  a pointwise projection (each with BatchNorm, GELU after the first two); the class
  token is not passed through the FFN but re-weighted channel-wise by a
  squeeze-excitation of the averaged output map (reduction 4).
- Pre-norm residual blocks with stochastic depth; the class token after a final
  LayerNorm feeds the linear head. The CIFAR sizes are the paper's DHVT-T / DHVT-S
  (patch 4, width 192 / 384, depth 12, 4 / 8 heads, MLP ratio 4).

Simplifications (where the paper leaves room): the head-token LayerNorm acts on the
full width of a head token (not per head segment); any image side divisible by the
patch size works (the paper's models are square); patch sizes are the powers of two
from 2 to 16 (the paper uses 2, 4 and 16). Choices for ImageWoof at 128 px, where the
paper is silent: :func:`hdvt_tiny_128` uses patch 8, so the 16×16 token grid is
close to the 14×14 of the paper's 224 px models.

The pointwise and depthwise convolutions are ``nn.Conv2d`` and every projection an
``nn.Linear``, so SINGD preconditions all of them (``nn.Conv2d`` with groups
included); the affine maps, norms and the head-token embeddings go to the fallback.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from singd_lightning.models._layers import DropPath, init_transformer_weights, linear_schedule


class Affine(nn.Module):
    """Learned per-channel scale and shift of a ``(B, C, H, W)`` map.

    Args:
        channels: Number of channels C.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.shift = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale + self.shift


class SequentialOverlappingPatchEmbed(nn.Module):
    """SOPE: affine, ``log2(patch_size)`` 3×3 stride-2 conv+BN steps, affine.

    Args:
        in_chans: Image channels.
        embed_dim: Token width.
        patch_size: Total downsampling, a power of two in [2, 16].
    """

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        steps = int(math.log2(patch_size))
        widths = [embed_dim // 2 ** (steps - 1 - i) for i in range(steps)]
        layers: list[nn.Module] = []
        previous = in_chans
        for i, width in enumerate(widths):
            if i > 0:
                layers.append(nn.GELU())
            layers += [nn.Conv2d(previous, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width)]
            previous = width
        self.pre_affine = Affine(in_chans)
        self.proj = nn.Sequential(*layers)
        self.post_affine = Affine(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Token map ``(B, embed_dim, H / patch_size, W / patch_size)``."""
        return self.post_affine(self.proj(self.pre_affine(x)))


class HeadInteractionAttention(nn.Module):
    """HI-MHSA: multi-head self-attention with one extra token per head.

    Args:
        dim: Token width.
        num_heads: Number of heads (divides ``dim``).
        qkv_bias: Bias in the query/key/value projection.
        attn_drop: Dropout of the attention weights.
        proj_drop: Dropout after the output projection.
    """

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.head_token_proj = nn.Linear(self.head_dim, dim)
        self.head_token_norm = nn.LayerNorm(dim)
        self.head_token_embed = nn.Parameter(torch.zeros(1, num_heads, dim))
        self.act = nn.GELU()
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.head_token_embed, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(B, 1 + N, C)``, the class token first; returns the same shape."""
        B, L, C = x.shape
        h = self.num_heads
        segments = x.view(B, L, h, self.head_dim).mean(dim=1)  # (B, h, C / h)
        head_tokens = self.act(self.head_token_norm(self.head_token_proj(segments))) + self.head_token_embed
        tokens = torch.cat([x, head_tokens], dim=1)
        q, k, v = self.qkv(tokens).view(B, L + h, 3, h, self.head_dim).permute(2, 0, 3, 1, 4)
        attn = self.attn_drop(((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1))
        out = self.proj((attn @ v).transpose(1, 2).reshape(B, L + h, C))
        # the head tokens pass what they gathered to the class token, then leave
        cls = out[:, :1] + out[:, L:].mean(dim=1, keepdim=True)
        return self.proj_drop(torch.cat([cls, out[:, 1:L]], dim=1))


class DynamicAggregationFFN(nn.Module):
    """DAFF: pointwise, depthwise (with shortcut), pointwise convolutions on the patch
    tokens; the class token re-weighted by a squeeze-excitation of the result.

    Args:
        dim: Token width.
        hidden_dim: Width of the expanded map.
        kernel_size: Side of the depthwise kernel.
        reduction: Squeeze-excitation reduction of the width.
    """

    def __init__(self, dim: int, hidden_dim: int, kernel_size: int = 3, reduction: int = 4) -> None:
        super().__init__()
        self.expand = nn.Conv2d(dim, hidden_dim, 1)
        self.bn1 = nn.BatchNorm2d(hidden_dim)
        self.depthwise = nn.Conv2d(hidden_dim, hidden_dim, kernel_size, padding=kernel_size // 2, groups=hidden_dim)
        self.bn2 = nn.BatchNorm2d(hidden_dim)
        self.project = nn.Conv2d(hidden_dim, dim, 1)
        self.bn3 = nn.BatchNorm2d(dim)
        self.act = nn.GELU()
        self.squeeze = nn.Linear(dim, max(dim // reduction, 1))
        self.excite = nn.Linear(max(dim // reduction, 1), dim)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        """``x``: ``(B, 1 + H * W, C)`` with ``grid = (H, W)``; returns the same shape."""
        B, L, C = x.shape
        cls, patches = x[:, :1], x[:, 1:]
        y = patches.transpose(1, 2).reshape(B, C, *grid)
        y = self.act(self.bn1(self.expand(y)))
        y = y + self.act(self.bn2(self.depthwise(y)))
        y = self.bn3(self.project(y))
        weight = self.excite(self.act(self.squeeze(y.mean(dim=(2, 3)))))
        return torch.cat([cls * weight.unsqueeze(1), y.flatten(2).transpose(1, 2)], dim=1)


class HDVTBlock(nn.Module):
    """Pre-norm block: ``x + HI-MHSA(LN(x))``, then ``x + DAFF(LN(x))``.

    Args:
        dim: Token width.
        num_heads: Attention heads.
        mlp_ratio: DAFF expansion ratio.
        qkv_bias: Bias in the query/key/value projection.
        drop: Dropout after the attention's output projection.
        attn_drop: Dropout of the attention weights.
        drop_path: Stochastic-depth rate of both residual branches.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = HeadInteractionAttention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = DynamicAggregationFFN(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.ffn(self.norm2(x), grid))


class HDVT(nn.Module):
    """The DHVT/HDVT classifier (see the module docstring for what follows the paper).

    Args:
        num_classes: Number of output logits.
        in_chans: Image channels.
        img_size: Side of the square training images (checked against the patch size).
        patch_size: Downsampling of the convolutional stem: 2, 4, 8 or 16.
        embed_dim: Token width.
        depth: Number of blocks.
        num_heads: Attention heads (divides ``embed_dim``).
        mlp_ratio: DAFF expansion ratio.
        qkv_bias: Bias in the query/key/value projections.
        drop_rate: Dropout after the attention projections.
        attn_drop_rate: Dropout of the attention weights.
        drop_path_rate: Stochastic depth, rising linearly to this rate over the blocks.

    Raises:
        ValueError: A size argument is out of range or they do not fit together.
    """

    def __init__(
        self,
        num_classes: int = 100,
        in_chans: int = 3,
        img_size: int = 32,
        patch_size: int = 4,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
    ) -> None:
        if patch_size not in (2, 4, 8, 16):
            raise ValueError(
                f"patch_size must be one of 2, 4, 8, 16 (a stack of stride-2 convolutions), got {patch_size!r}."
            )
        for name, value in (("num_classes", num_classes), ("in_chans", in_chans), ("embed_dim", embed_dim),
                            ("depth", depth), ("num_heads", num_heads), ("img_size", img_size)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}).")
        if embed_dim % (patch_size // 2):
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by patch_size / 2 ({patch_size // 2}): "
                             "the stem halves the width at each stride-2 step.")
        if img_size % patch_size:
            raise ValueError(f"img_size ({img_size}) must be a multiple of patch_size ({patch_size}).")
        super().__init__()
        self.num_classes = num_classes
        self.patch_size = patch_size
        self.num_features = embed_dim
        self.patch_embed = SequentialOverlappingPatchEmbed(in_chans, embed_dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        rates = linear_schedule(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            HDVTBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, rate) for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        self.apply(init_transformer_weights)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """The class token (exempt from weight decay, as in timm's ViTs)."""
        return {"cls_token"}

    def forward_features(self, x: Tensor) -> Tensor:
        """The final class token, shape ``(B, embed_dim)``."""
        if x.shape[-1] % self.patch_size or x.shape[-2] % self.patch_size:
            raise ValueError(f"HDVT: the image sides {tuple(x.shape[-2:])} must be multiples of "
                             f"the patch size {self.patch_size}.")
        tokens = self.patch_embed(x)
        grid = (tokens.shape[2], tokens.shape[3])
        tokens = tokens.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        for block in self.blocks:
            x = block(x, grid)
        return self.norm(x[:, 0])

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


def hdvt_tiny_32(num_classes: int = 100, in_chans: int = 3, **kwargs) -> HDVT:
    """DHVT-T for 32 px (the paper's CIFAR model: patch 4, width 192, depth 12, 4 heads; 6.0M parameters)."""
    cfg = dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=4, mlp_ratio=4.0)
    return HDVT(num_classes=num_classes, in_chans=in_chans, **{**cfg, **kwargs})


def hdvt_small_32(num_classes: int = 100, in_chans: int = 3, **kwargs) -> HDVT:
    """DHVT-S for 32 px (patch 4, width 384, depth 12, 8 heads)."""
    cfg = dict(img_size=32, patch_size=4, embed_dim=384, depth=12, num_heads=8, mlp_ratio=4.0)
    return HDVT(num_classes=num_classes, in_chans=in_chans, **{**cfg, **kwargs})


def hdvt_tiny_128(num_classes: int = 10, in_chans: int = 3, **kwargs) -> HDVT:
    """DHVT-T for 128 px ImageWoof: patch 8 (16×16 tokens; our choice, the paper is silent)."""
    cfg = dict(img_size=128, patch_size=8, embed_dim=192, depth=12, num_heads=4, mlp_ratio=4.0)
    return HDVT(num_classes=num_classes, in_chans=in_chans, **{**cfg, **kwargs})


def hdvt_nano(num_classes: int = 10, in_chans: int = 3, **kwargs) -> HDVT:
    """Two blocks, width 32, patch 4, for 32 px: fast CPU runs and tests."""
    cfg = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
    return HDVT(num_classes=num_classes, in_chans=in_chans, **{**cfg, **kwargs})


__all__ = ["HDVT", "HDVTBlock", "hdvt_nano", "hdvt_small_32", "hdvt_tiny_128", "hdvt_tiny_32"]
