"""VGG for small images (CIFAR-style).

Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
Recognition" (ICLR 2015), in the CIFAR form used by the SINGD comparisons: 3×3
convolutions with BatchNorm and ReLU, max-pooling between stages, and a single
linear classifier. An adaptive average pool before the classifier makes the
same network accept 32 px and larger inputs (e.g. 128–160 px ImageWoof).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

CfgItem = int | str

#: Layer configurations; integers are conv widths, ``"M"`` is a 2×2 max-pool.
# fmt: off
VGG_CFGS: dict[str, list[CfgItem]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
              512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
              512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
    "vgg_small": [16, "M", 32, "M", 64, "M"],
}
# fmt: on


class VGG(nn.Module):
    """VGG with BatchNorm and a global-pool linear head.

    Args:
        cfg: Conv widths and ``"M"`` (max-pool) markers, in order.
        num_classes: Number of output logits.
        in_chans: Number of input image channels.
        hidden_dim: Width of an optional hidden classifier layer (Linear, ReLU,
            Dropout); ``0`` gives a single linear classifier.
        drop_rate: Dropout before the final linear layer.
        batch_norm: Insert BatchNorm after each convolution.
    """

    def __init__(
        self,
        cfg: Sequence[CfgItem],
        num_classes: int = 100,
        in_chans: int = 3,
        hidden_dim: int = 0,
        drop_rate: float = 0.0,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_chans
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            if not isinstance(item, int) or item <= 0:
                raise ValueError(f"cfg entries must be positive ints or 'M', got {item!r}")
            layers.append(nn.Conv2d(channels, item, kernel_size=3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(item))
            layers.append(nn.ReLU(inplace=True))
            channels = item
        if channels == in_chans:
            raise ValueError("cfg must contain at least one convolution")
        self.num_classes = num_classes
        self.num_features = channels
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        head: list[nn.Module] = []
        if hidden_dim > 0:
            head += [nn.Linear(channels, hidden_dim), nn.ReLU(inplace=True), nn.Dropout(drop_rate)]
            channels = hidden_dim
        elif drop_rate > 0:
            head.append(nn.Dropout(drop_rate))
        head.append(nn.Linear(channels, num_classes))
        self.classifier = nn.Sequential(*head)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled feature vector, shape ``(B, num_features)``."""
        return self.pool(self.features(x)).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.forward_features(x))


def _vgg(cfg_name: str, num_classes: int, in_chans: int, **kwargs) -> VGG:
    return VGG(VGG_CFGS[cfg_name], num_classes=num_classes, in_chans=in_chans, **kwargs)


def vgg11(num_classes: int = 100, in_chans: int = 3, **kwargs) -> VGG:
    """VGG-11 with BatchNorm (≈9.3M parameters for 100 classes)."""
    return _vgg("vgg11", num_classes, in_chans, **kwargs)


def vgg13(num_classes: int = 100, in_chans: int = 3, **kwargs) -> VGG:
    """VGG-13 with BatchNorm (≈9.5M parameters for 100 classes)."""
    return _vgg("vgg13", num_classes, in_chans, **kwargs)


def vgg16(num_classes: int = 100, in_chans: int = 3, **kwargs) -> VGG:
    """VGG-16 with BatchNorm (≈14.8M parameters for 100 classes)."""
    return _vgg("vgg16", num_classes, in_chans, **kwargs)


def vgg19(num_classes: int = 100, in_chans: int = 3, **kwargs) -> VGG:
    """VGG-19 with BatchNorm (≈20.1M parameters for 100 classes)."""
    return _vgg("vgg19", num_classes, in_chans, **kwargs)


def vgg_small(num_classes: int = 10, in_chans: int = 3, **kwargs) -> VGG:
    """Three-conv VGG (16-32-64 channels, ≈24k parameters) for fast tests."""
    return _vgg("vgg_small", num_classes, in_chans, **kwargs)


__all__ = ["VGG", "VGG_CFGS", "vgg11", "vgg13", "vgg16", "vgg19", "vgg_small"]
