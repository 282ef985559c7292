"""ConvMixer.

Trockman & Kolter, "Patches Are All You Need?" (TMLR 2023). A patch-embedding
convolution followed by ``depth`` blocks of a residual depthwise convolution and
a pointwise convolution, each followed by GELU and BatchNorm; then global average
pooling and a linear head. ``ConvMixer-h/d`` has width ``h`` and depth ``d``.
"""

from __future__ import annotations

from torch import Tensor, nn


class Residual(nn.Module):
    """``x + fn(x)``.

    Args:
        fn: The residual branch.
    """

    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fn(x)


class ConvMixer(nn.Module):
    """ConvMixer image classifier.

    Args:
        dim: Channel width ``h`` of every block.
        depth: Number of mixer blocks ``d``.
        kernel_size: Depthwise (spatial mixing) kernel size.
        patch_size: Kernel size and stride of the patch embedding.
        num_classes: Number of output logits.
        in_chans: Number of input image channels.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        kernel_size: int = 9,
        patch_size: int = 7,
        num_classes: int = 100,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = dim
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size),
            nn.GELU(),
            nn.BatchNorm2d(dim),
        )
        self.blocks = nn.Sequential(
            *[
                nn.Sequential(
                    Residual(
                        nn.Sequential(
                            nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"),
                            nn.GELU(),
                            nn.BatchNorm2d(dim),
                        )
                    ),
                    nn.Conv2d(dim, dim, kernel_size=1),
                    nn.GELU(),
                    nn.BatchNorm2d(dim),
                )
                for _ in range(depth)
            ]
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(dim, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled feature vector, shape ``(B, dim)``."""
        return self.pool(self.blocks(self.stem(x))).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


def convmixer_256_8(num_classes: int = 100, in_chans: int = 3, **kwargs) -> ConvMixer:
    """ConvMixer-256/8, kernel 5, patch 2: the CIFAR setting (≈0.62M parameters)."""
    kwargs = {"kernel_size": 5, "patch_size": 2, **kwargs}
    return ConvMixer(256, 8, num_classes=num_classes, in_chans=in_chans, **kwargs)


def convmixer_256_16(num_classes: int = 100, in_chans: int = 3, **kwargs) -> ConvMixer:
    """ConvMixer-256/16, kernel 9, patch 8: for 128–160 px ImageWoof (≈1.5M parameters).

    Patch 8 turns a 128 px image into a 16×16 grid (20×20 at 160 px), comparable
    to the 16×16 grid of ``convmixer_256_8`` on 32 px CIFAR images.
    """
    kwargs = {"kernel_size": 9, "patch_size": 8, **kwargs}
    return ConvMixer(256, 16, num_classes=num_classes, in_chans=in_chans, **kwargs)


def convmixer_tiny(num_classes: int = 10, in_chans: int = 3, **kwargs) -> ConvMixer:
    """ConvMixer-32/2, kernel 3, patch 4, for fast tests."""
    kwargs = {"kernel_size": 3, "patch_size": 4, **kwargs}
    return ConvMixer(32, 2, num_classes=num_classes, in_chans=in_chans, **kwargs)


__all__ = ["ConvMixer", "Residual", "convmixer_256_16", "convmixer_256_8", "convmixer_tiny"]
