"""RepViT (Wang et al., "RepViT: Revisiting Mobile CNN From ViT Perspective", CVPR
2024) through timm.

timm's ``RepVit`` is the upstream architecture: a stride-4 conv stem, four stages
of RepViT blocks (re-parameterisable depthwise token mixer, squeeze-excite, 1×1
channel mixer), downsampling between stages (input / 32 in all). The upstream code
has no small-image variant and the SINGD paper does not say how it adapted one, so
the architecture is left unchanged: at 32 px the stages see 8, 4, 2 and 1 px maps,
at 128 px 32, 16, 8 and 4 px. We build it without the distillation head
(``distillation=False``): there is no teacher in these runs, and timm would
otherwise average two classifier heads.

Every convolution is an ``nn.Conv2d`` (depthwise ones included) and the heads are
``nn.Linear``, which SINGD preconditions; BatchNorm goes to the fallback. The
training-time branches are kept (no re-parameterisation), so every branch is
trained. timm is imported when a model is built (it is in the ``app`` extra).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from singd_lightning.models.timm_models import create_timm_model


def repvit_m0_9(num_classes: int = 100, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """RepViT-M0.9 (widths 48-96-192-384, depths 2-2-14-2; 4.7M parameters at 10
    classes), any input size of at least 32 px."""
    options = {"distillation": False, **kwargs}
    return create_timm_model("repvit_m0_9", num_classes=num_classes, in_chans=in_chans, **options)


def repvit_nano(num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """A one-block-per-stage RepViT (widths 16-32-48-64): fast CPU runs and tests."""
    from timm.models.repvit import RepVit

    options: dict[str, Any] = {
        "embed_dim": (16, 32, 48, 64),
        "depth": (1, 1, 1, 1),
        "distillation": False,
        **kwargs,
    }
    return RepVit(num_classes=num_classes, in_chans=in_chans, **options)


__all__ = ["repvit_m0_9", "repvit_nano"]
