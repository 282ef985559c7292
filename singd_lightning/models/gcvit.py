"""GC-ViT (Hatamizadeh et al., "Global Context Vision Transformers", ICML 2023)
through timm, sized for the paper's 32 px and 128 px inputs.

timm's ``GlobalContextVit`` is the upstream architecture: a strided-conv stem
(input / 4), four stages of alternating local-window and global-query attention,
downsampling between stages. Its window sizes default to ``img_size / (32, 32, 16,
32)``, i.e. 1×1 windows at 32 px. The upstream code has no CIFAR variant, so at
32 px we set the windows ourselves: ``(4, 4, 2, 1)`` on the 8, 4, 2, 1 px feature
maps (stage 1 keeps 2×2 windows, so local and global attention still differ there;
from stage 2 on a window is the whole map). At 128 px timm's defaults apply
(windows 4, 4, 8, 4 on 32, 16, 8, 4 px maps).

Every projection is an ``nn.Linear`` and every convolution an ``nn.Conv2d``, which
SINGD preconditions; the relative position bias tables and norms go to the
fallback. timm is imported when a model is built (it is in the ``app`` extra).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from singd_lightning.models.timm_models import create_timm_model

#: Window sizes per stage at 32 px (feature maps 8, 4, 2, 1 px).
WINDOWS_32: tuple[int, int, int, int] = (4, 4, 2, 1)


def gcvit_xxtiny_32(num_classes: int = 100, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """GC-ViT-XXTiny (depths 2-2-6-2, width 64; 11.4M parameters) for 32 px."""
    options = {"img_size": 32, "window_size": WINDOWS_32, **kwargs}
    return create_timm_model("gcvit_xxtiny", num_classes=num_classes, in_chans=in_chans, **options)


def gcvit_xxtiny_128(num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """GC-ViT-XXTiny for 128 px (timm's window sizes for that input)."""
    options = {"img_size": 128, **kwargs}
    return create_timm_model("gcvit_xxtiny", num_classes=num_classes, in_chans=in_chans, **options)


def gcvit_nano(num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """A one-block-per-stage, width-16 GC-ViT for 32 px: fast CPU runs and tests."""
    from timm.models.gcvit import GlobalContextVit

    options: dict[str, Any] = {
        "img_size": 32,
        "window_size": WINDOWS_32,
        "embed_dim": 16,
        "depths": (1, 1, 1, 1),
        "num_heads": (1, 1, 2, 2),
        **kwargs,
    }
    return GlobalContextVit(num_classes=num_classes, in_chans=in_chans, **options)


__all__ = ["WINDOWS_32", "gcvit_nano", "gcvit_xxtiny_128", "gcvit_xxtiny_32"]
