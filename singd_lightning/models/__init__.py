"""Image and sequence classifiers for the SINGD comparisons (one file per family).

Every factory has the signature ``factory(num_classes, in_chans, **kwargs)``; the
sequence models (:data:`SEQUENCE_MODELS`) also take ``seq_len``, the input length;
extra keyword arguments override the family constructor's defaults. Use
:func:`create_model` to build one by name::

    model = create_model("cct_7_3x1_32", num_classes=100)

Parameter counts are for the number of classes in brackets.

| name | family | input | parameters |
|---|---|---|---|
| ``vgg11`` / ``vgg13`` | VGG-BN | any (≥32 px) | 9.27M / 9.46M (100) |
| ``vgg16`` / ``vgg19`` | VGG-BN | any (≥32 px) | 14.77M / 20.08M (100) |
| ``vgg_small`` | VGG-BN (test size) | any | 24k (10) |
| ``convmixer_256_8`` | ConvMixer-256/8, k5 p2 | 32 px | 0.62M (100) |
| ``convmixer_256_16`` | ConvMixer-256/16, k9 p8 | 128–160 px | 1.48M (100) |
| ``convmixer_tiny`` | ConvMixer-32/2 | any | 5k (10) |
| ``cct_7_3x1_32`` | CCT-7/3x1 | 32 px | 3.78M (100) |
| ``cct_7_7x2_128`` / ``cct_7_7x2_160`` | CCT-7/7x2 | 128 / 160 px | 4.52M / 4.53M (10) |
| ``cct_tiny`` | CCT (test size) | 32 px | 20k (10) |
| ``swin_tiny_32`` | Swin, p2 w4 | 32 px | 7.08M (100) |
| ``swin_tiny_128`` / ``swin_tiny_160`` | Swin, p8 w4 / w5 | 128 / 160 px | 7.07M (10) |
| ``swin_nano`` | Swin (test size) | 32 px | 26k (10) |
| ``gcvit_xxtiny_32`` / ``gcvit_xxtiny_128`` | GC-ViT-XXTiny (timm) | 32 / 128 px | 11.4M / 11.5M (10) |
| ``gcvit_nano`` | GC-ViT (test size, timm) | 32 px | 0.37M (10) |
| ``repvit_m0_9`` | RepViT-M0.9 (timm, no distillation head) | any (≥32 px) | 4.7M (10) |
| ``repvit_nano`` | RepViT (test size, timm) | any (≥32 px) | 94k (10) |
| ``hdvt_tiny_32`` / ``hdvt_small_32`` | HDVT (DHVT-T / -S), patch 4 | 32 px | 6.0M / 23.4M (100) |
| ``hdvt_tiny_128`` | HDVT (DHVT-T), patch 8 | 128 px | 6.0M (10) |
| ``hdvt_nano`` | HDVT (test size) | 32 px | 30k (100) |
| ``gcn`` | GCN, 2 layers, 16 hidden | a graph's nodes (``data=cora``) | 23k (7) |
| ``mlp`` | MLP 40-256-256 | 1-D sequences, length ``seq_len`` | 78k (10) |
| ``cnn1d`` | Conv1d 32-64-64, k5, global pool | 1-D sequences, any length | 32k (10) |
| ``gpt`` | GPT decoder, 4 blocks of width 128 | token ids, length ≤ ``seq_len`` | 0.83M (256) |

Any timm model: :func:`create_timm_model` (``create_timm_model("resnet18",
num_classes=10)``; the app's ``model=timm model.name=...``).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from singd_lightning.models.cct import CCT, cct_7_3x1_32, cct_7_7x2_128, cct_7_7x2_160, cct_tiny
from singd_lightning.models.cnn1d import CNN1d, cnn1d
from singd_lightning.models.convmixer import (
    ConvMixer,
    convmixer_256_8,
    convmixer_256_16,
    convmixer_tiny,
)
from singd_lightning.models.gcn import GCN, gcn
from singd_lightning.models.gcvit import gcvit_nano, gcvit_xxtiny_32, gcvit_xxtiny_128
from singd_lightning.models.gpt import GPT, gpt
from singd_lightning.models.hdvt import HDVT, hdvt_nano, hdvt_small_32, hdvt_tiny_32, hdvt_tiny_128
from singd_lightning.models.mlp import MLP, mlp
from singd_lightning.models.repvit import repvit_m0_9, repvit_nano
from singd_lightning.models.swin import (
    SwinTransformer,
    swin_nano,
    swin_tiny_32,
    swin_tiny_128,
    swin_tiny_160,
)
from singd_lightning.models.timm_models import create_timm_model
from singd_lightning.models.vgg import VGG, vgg11, vgg13, vgg16, vgg19, vgg_small

#: Model factories by name.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "vgg11": vgg11,
    "vgg13": vgg13,
    "vgg16": vgg16,
    "vgg19": vgg19,
    "vgg_small": vgg_small,
    "convmixer_256_8": convmixer_256_8,
    "convmixer_256_16": convmixer_256_16,
    "convmixer_tiny": convmixer_tiny,
    "cct_7_3x1_32": cct_7_3x1_32,
    "cct_7_7x2_128": cct_7_7x2_128,
    "cct_7_7x2_160": cct_7_7x2_160,
    "cct_tiny": cct_tiny,
    "swin_tiny_32": swin_tiny_32,
    "swin_tiny_128": swin_tiny_128,
    "swin_tiny_160": swin_tiny_160,
    "swin_nano": swin_nano,
    "gcvit_xxtiny_32": gcvit_xxtiny_32,
    "gcvit_xxtiny_128": gcvit_xxtiny_128,
    "gcvit_nano": gcvit_nano,
    "repvit_m0_9": repvit_m0_9,
    "repvit_nano": repvit_nano,
    "hdvt_tiny_32": hdvt_tiny_32,
    "hdvt_small_32": hdvt_small_32,
    "hdvt_tiny_128": hdvt_tiny_128,
    "hdvt_nano": hdvt_nano,
    "gcn": gcn,
    "mlp": mlp,
    "cnn1d": cnn1d,
    "gpt": gpt,
}

#: Names of the models whose input is a 1-D sequence ``(N, in_chans, seq_len)``; the
#: others take images ``(N, in_chans, H, W)``.
SEQUENCE_MODELS: frozenset[str] = frozenset({"mlp", "cnn1d"})
#: Names of the models whose input is a whole graph ``(features, adjacency)`` and whose
#: output is one row of logits per node (``data=cora``).
GRAPH_MODELS: frozenset[str] = frozenset({"gcn"})
#: Names of the models whose input is token ids ``(N, S)`` and whose output is
#: next-token logits ``(N, S, num_classes)`` (``data=text``).
TOKEN_MODELS: frozenset[str] = frozenset({"gpt"})


def create_model(name: str, num_classes: int, in_chans: int = 3, **kwargs) -> nn.Module:
    """Build a registered model.

    Args:
        name: A key of :data:`MODELS`.
        num_classes: Number of output logits.
        in_chans: Number of input image channels.
        **kwargs: Overrides for the family constructor (e.g. ``img_size``,
            ``drop_path_rate``).

    Raises:
        ValueError: If ``name`` is not registered; the message lists valid names.
    """
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(
            f"Unknown model {name!r}. Valid names: {', '.join(sorted(MODELS))}"
        ) from None
    return factory(num_classes=num_classes, in_chans=in_chans, **kwargs)


def list_models() -> list[str]:
    """Sorted names of the registered models."""
    return sorted(MODELS)


__all__ = [
    "CCT",
    "CNN1d",
    "GCN",
    "GPT",
    "GRAPH_MODELS",
    "HDVT",
    "MLP",
    "MODELS",
    "SEQUENCE_MODELS",
    "TOKEN_MODELS",
    "VGG",
    "ConvMixer",
    "SwinTransformer",
    "create_model",
    "create_timm_model",
    "list_models",
    *sorted(MODELS),
]
