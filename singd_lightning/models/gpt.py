"""A small GPT-style decoder for byte-level language modelling (``data=text``).

Pre-norm transformer blocks (LayerNorm, causal multi-head self-attention, LayerNorm,
GELU MLP, each with a residual connection), a learned positional embedding, a final
LayerNorm and a linear head over the vocabulary. Every projection is an
``nn.Linear`` (attention included: ``qkv`` and ``proj``), so the Kronecker
optimizers precondition all of them; the token embedding is an ``nn.Embedding``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    return value


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position ``t`` sees positions ``≤ t``.

    Args:
        dim: Embedding width.
        num_heads: Attention heads (must divide ``dim``).
        attn_drop: Dropout on the attention weights (training only).
        proj_drop: Dropout after the output projection.
        qkv_bias: Biases in the query/key/value projection.
    """

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, dim = x.shape
        # (B, S, 3, H, D/H) -> three (B, H, S, D/H)
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        drop = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, length, dim)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_rate: float, qkv_bias: bool) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, num_heads, drop_rate, drop_rate, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(drop_rate))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """Decoder-only transformer: token ids ``(N, S)`` to next-token logits
    ``(N, S, vocab_size)``, for any ``S ≤ block_size``.

    Args:
        vocab_size: Number of tokens (256 for bytes).
        block_size: Longest input (the positional embedding's length).
        depth: Transformer blocks.
        embed_dim: Embedding width.
        num_heads: Attention heads (must divide ``embed_dim``).
        mlp_ratio: MLP hidden width over ``embed_dim``.
        drop_rate: Dropout on embeddings, attention weights and block outputs.
        qkv_bias: Biases in the query/key/value projections.
        tie_embeddings: Share the token embedding's weight with the head (the head
            then has no bias). The Kronecker optimizers train a weight shared by
            two layers with their first-order fallback.
    """

    def __init__(
        self,
        vocab_size: int = 256,
        block_size: int = 128,
        depth: int = 4,
        embed_dim: int = 128,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        qkv_bias: bool = True,
        tie_embeddings: bool = False,
    ) -> None:
        for name, value in (
            ("vocab_size", vocab_size), ("block_size", block_size), ("depth", depth),
            ("embed_dim", embed_dim), ("num_heads", num_heads),
        ):
            _positive_int(name, value)
        if embed_dim % num_heads:
            raise ValueError(f"num_heads must divide embed_dim, got embed_dim={embed_dim}, num_heads={num_heads}.")
        if not (isinstance(mlp_ratio, (int, float)) and mlp_ratio > 0 and int(embed_dim * mlp_ratio) >= 1):
            raise ValueError(f"mlp_ratio must be a number > 0 (at least one hidden unit), got {mlp_ratio!r}.")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate!r}.")
        if not isinstance(tie_embeddings, bool):
            raise ValueError(f"tie_embeddings must be true or false, got {tie_embeddings!r}.")
        super().__init__()
        self.num_classes = vocab_size
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.tie_embeddings = tie_embeddings
        self.tok_embed = nn.Embedding(vocab_size, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, block_size, embed_dim))
        self.drop = nn.Dropout(drop_rate)
        self.blocks = nn.Sequential(*(Block(embed_dim, num_heads, mlp_ratio, drop_rate, qkv_bias) for _ in range(depth)))
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, vocab_size, bias=not tie_embeddings)
        self.apply(self._init_weights)
        nn.init.normal_(self.pos_embed, std=0.02)
        # GPT-2: residual projections scaled down with depth
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, std=0.02 / (2 * depth) ** 0.5)
            nn.init.normal_(block.mlp[2].weight, std=0.02 / (2 * depth) ** 0.5)
        if tie_embeddings:
            self.head.weight = self.tok_embed.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameters timm-style optimizers exempt from weight decay."""
        return {"pos_embed"}

    def forward(self, idx: Tensor) -> Tensor:
        if idx.ndim != 2 or idx.is_floating_point() or idx.shape[1] > self.block_size:
            raise ValueError(
                f"GPT expects token ids of shape (N, S) with S <= block_size={self.block_size}, "
                f"got {tuple(idx.shape)} ({idx.dtype})."
            )
        x = self.drop(self.tok_embed(idx) + self.pos_embed[:, : idx.shape[1]])
        return self.head(self.norm(self.blocks(x)))


def gpt(num_classes: int = 256, in_chans: int = 1, seq_len: int = 128, **kwargs) -> GPT:
    """GPT for ``data=text``: 4 blocks of width 128, 4 heads, 0.8M parameters (256 tokens).

    Args:
        num_classes: The vocabulary size (the data's ``num_classes``).
        in_chans: Unused (token ids have no channels); taken for the common signature.
        seq_len: The context length (the data's ``seq_len``).
        **kwargs: Other :class:`GPT` arguments.
    """
    return GPT(vocab_size=num_classes, block_size=seq_len, **kwargs)


__all__ = ["GPT", "gpt"]
