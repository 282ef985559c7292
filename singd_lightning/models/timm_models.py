"""Any `timm <https://github.com/huggingface/pytorch-image-models>`_ model, sized
like the built-in families (``factory(num_classes, in_chans, **kwargs)``).

timm is imported only when a timm model is built: it is part of the ``app`` extra,
not of the torch-only core.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from torch import nn


def _import_timm() -> Any:
    try:
        import timm
    except ImportError as err:
        raise ImportError(
            "timm models need the timm package: pip install timm (or singd-lightning[app])."
        ) from err
    return timm


def create_timm_model(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    pretrained: bool = False,
    kwargs: Mapping[str, Any] | None = None,
    **extra: Any,
) -> nn.Module:
    """Build ``timm.create_model(name, ...)`` with this data's classes and channels.

    Args:
        name: A timm model name (``timm.list_models()``; a pretrained tag such as
            ``"resnet18.a1_in1k"`` or an ``"hf-hub:"`` name works too).
        num_classes: Number of output logits.
        in_chans: Number of input image channels.
        pretrained: Load timm's pretrained weights (downloads them); off by default.
        kwargs: Keyword arguments of the timm model's constructor, e.g.
            ``{"img_size": 32, "patch_size": 4}`` for a ViT on 32 px images.
        **extra: More constructor arguments, as for the built-in families.

    Raises:
        ValueError: ``name`` is not a timm model (the message says how to list the
            valid names and suggests close ones), or an argument is given twice.
    """
    timm = _import_timm()
    from timm.models import parse_model_name

    source, _ = parse_model_name(name) if isinstance(name, str) else (None, name)
    if not isinstance(name, str) or (source is None and not timm.is_model(name)):
        close = difflib.get_close_matches(str(name), timm.list_models(), n=5, cutoff=0.6)
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise ValueError(
            f"Unknown timm model {name!r}: model.name must be a name of timm.list_models() "
            f"(e.g. python -c \"import timm; print(timm.list_models('resnet*'))\").{hint}"
        )
    options = dict(kwargs or {})
    twice = sorted(set(options) & set(extra))
    if twice:
        raise ValueError(f"model: {twice} given both in kwargs and as keys of their own; give each once.")
    options.update(extra)
    reserved = sorted(set(options) & {"num_classes", "in_chans", "pretrained", "model_name"})
    if reserved:
        raise ValueError(
            f"model.kwargs must not set {reserved}: the number of classes and channels come "
            "from the data module, pretrained is model.pretrained."
        )
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **options)


__all__ = ["create_timm_model"]
