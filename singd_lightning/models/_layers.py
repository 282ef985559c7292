"""Small building blocks shared by the transformer families.

Every learnable projection is an ``nn.Linear`` (or ``nn.Conv2d``) so that the
Kronecker-factored preconditioner covers it; norms and embeddings are trained by
the optimizer's first-order fallback.
"""

from __future__ import annotations

from torch import Tensor, nn


def drop_path(x: Tensor, drop_prob: float, training: bool) -> Tensor:
    """Stochastic depth: zero whole samples of a residual branch.

    Args:
        x: Residual branch output, batch dimension first.
        drop_prob: Probability of dropping a sample's branch.
        training: Only active in training mode.

    Returns:
        ``x`` with dropped samples zeroed and kept ones rescaled by ``1/(1-p)``.
    """
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = x.new_empty(shape).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    """Module wrapper around :func:`drop_path`.

    Args:
        drop_prob: Probability of dropping a sample's residual branch.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:g}"


class Mlp(nn.Module):
    """Two-layer token MLP: Linear, GELU, dropout, Linear, dropout.

    Args:
        dim: Input and output width.
        hidden_dim: Width of the hidden layer.
        drop: Dropout probability after each linear layer's activation/output.
    """

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))


def init_transformer_weights(module: nn.Module) -> None:
    """Truncated-normal(0.02) linear weights, zero biases, unit LayerNorms.

    Meant for ``model.apply(init_transformer_weights)``.
    """
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def linear_schedule(end: float, steps: int) -> list[float]:
    """``steps`` values from 0 to ``end`` (stochastic-depth rates per block).

    Plain Python, so models can be built on the ``meta`` device.
    """
    if steps <= 1:
        return [0.0] * steps
    return [end * i / (steps - 1) for i in range(steps)]


def num_params(model: nn.Module, trainable_only: bool = True) -> int:
    """Count a model's parameters.

    Args:
        model: Any module.
        trainable_only: Skip parameters with ``requires_grad=False``.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "DropPath",
    "Mlp",
    "drop_path",
    "init_transformer_weights",
    "linear_schedule",
    "num_params",
]
