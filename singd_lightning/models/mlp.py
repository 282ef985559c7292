"""Multilayer perceptron for 1-D sequences (MNIST-1D).

The input ``(N, in_chans, seq_len)`` is flattened and goes through hidden Linear
layers with ReLU, then a linear classifier; the default for MNIST-1D is 40-256-256-10.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    return value


class MLP(nn.Module):
    """Flatten, ``Linear``-``ReLU`` blocks, linear classifier.

    Args:
        num_classes: Number of output logits.
        in_chans: Channels of the input sequence.
        seq_len: Length of the input sequence; ``in_chans * seq_len`` inputs.
        hidden_dims: Widths of the hidden layers, in order (empty: a linear model).
        drop_rate: Dropout after each hidden layer.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        seq_len: int = 40,
        hidden_dims: Sequence[int] = (256, 256),
        drop_rate: float = 0.0,
    ) -> None:
        for name, value in (("num_classes", num_classes), ("in_chans", in_chans), ("seq_len", seq_len)):
            _positive_int(name, value)
        widths = [_positive_int("hidden_dims entries", w) for w in hidden_dims]
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate!r}.")
        super().__init__()
        self.num_classes = num_classes
        self.in_features = in_chans * seq_len
        layers: list[nn.Module] = [nn.Flatten(1)]
        features = self.in_features
        for width in widths:
            layers += [nn.Linear(features, width), nn.ReLU(inplace=True)]
            if drop_rate > 0:
                layers.append(nn.Dropout(drop_rate))
            features = width
        self.num_features = features
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim < 2 or x[0].numel() != self.in_features:
            raise ValueError(
                f"MLP expects inputs of {self.in_features} features per sample (in_chans * seq_len), "
                f"got shape {tuple(x.shape)}."
            )
        return self.head(self.body(x))


def mlp(num_classes: int = 10, in_chans: int = 1, seq_len: int = 40, **kwargs) -> MLP:
    """MLP, 40-256-256-10 for MNIST-1D by default."""
    return MLP(num_classes=num_classes, in_chans=in_chans, seq_len=seq_len, **kwargs)


__all__ = ["MLP", "mlp"]
