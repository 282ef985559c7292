"""Small 1-D convolutional network for sequences (MNIST-1D).

Three ``Conv1d`` layers (kernel 5; the last two with stride 2), each followed by
optional BatchNorm and ReLU, global average pooling over the sequence, and a linear
classifier. Any sequence length of at least 1 works.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class CNN1d(nn.Module):
    """Conv1d-(BatchNorm)-ReLU blocks, global average pool, linear classifier.

    Args:
        num_classes: Number of output logits.
        in_chans: Channels of the input sequence.
        channels: Output channels of the convolutions, in order (at least one).
        kernel_size: Odd kernel size of every convolution ("same" padding).
        batch_norm: Insert BatchNorm after each convolution.
        drop_rate: Dropout before the classifier.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        channels: Sequence[int] = (32, 64, 64),
        kernel_size: int = 5,
        batch_norm: bool = True,
        drop_rate: float = 0.0,
    ) -> None:
        widths = list(channels)
        checks = [("num_classes", num_classes), ("in_chans", in_chans), *(("channels entries", w) for w in widths)]
        for name, value in checks:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        if not widths:
            raise ValueError("channels must contain at least one convolution width.")
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd integer >= 1, got {kernel_size!r}.")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate!r}.")
        super().__init__()
        self.num_classes = num_classes
        layers: list[nn.Module] = []
        features = in_chans
        for i, width in enumerate(widths):
            # Stride 2 after the first layer halves the length, widening the receptive field.
            stride = 1 if i == 0 else 2
            layers.append(
                nn.Conv1d(features, width, kernel_size, stride=stride, padding=kernel_size // 2, bias=not batch_norm)
            )
            if batch_norm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(nn.ReLU(inplace=True))
            features = width
        self.num_features = features
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Sequential(nn.Flatten(1), nn.Dropout(drop_rate), nn.Linear(features, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 3:
            raise ValueError(f"CNN1d expects sequences (N, in_chans, length), got shape {tuple(x.shape)}.")
        return self.head(self.pool(self.features(x)))


def cnn1d(num_classes: int = 10, in_chans: int = 1, seq_len: int | None = None, **kwargs) -> CNN1d:
    """Three-layer (32-64-64) 1-D conv net; ``seq_len`` is accepted (global pooling
    makes any length work) so that every sequence model takes the data's length."""
    return CNN1d(num_classes=num_classes, in_chans=in_chans, **kwargs)


__all__ = ["CNN1d", "cnn1d"]
