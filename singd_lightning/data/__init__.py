"""Lightning data modules for the SINGD comparisons.

Each module exposes ``num_classes``, ``in_chans`` and ``image_size`` (a sequence
module: ``seq_len`` instead). Build one by name with :func:`create_datamodule`::

    dm = create_datamodule("digits", batch_size=64)

| name | data | classes | size | needs files |
|---|---|---|---|---|
| ``digits`` | scikit-learn digits (offline default) | 10 | 32 px | no |
| ``cifar100`` | CIFAR-100 | 100 | 32 px | ``cifar-100-python`` |
| ``imagewoof`` | ImageWoof-10 (160 px archive) | 10 | 128 px (configurable) | ``imagewoof2-160`` |
| ``mnist1d`` | MNIST-1D sequences (generated offline) | 10 | length 40, 1 channel | no |
| ``synthetic`` | class patterns plus noise (generated offline) | 100 | 32 px | no |
| ``cora`` | Cora citation graph, Planetoid split (full batch) | 7 | 2708 nodes, 1433 features | ``planetoid/ind.cora.*`` |
| ``imagenet100`` | ImageNet-100 (CMC classes) or any ImageFolder | from the folders | 224 px (configurable) | ``imagenet100/{train,val}`` |
| ``text`` | Python's help texts (``pydoc_data``), next-byte prediction | 256 (bytes) | ``block_size`` bytes | no |
"""

from __future__ import annotations

from singd_lightning.data._common import DatasetNotFoundError, ImageClassificationDataModule
from singd_lightning.data.cifar100 import CIFAR100DataModule
from singd_lightning.data.cora import CoraDataModule
from singd_lightning.data.digits import DigitsDataModule
from singd_lightning.data.imagenet100 import ImageNet100DataModule
from singd_lightning.data.imagewoof import ImageWoofDataModule
from singd_lightning.data.mnist1d import MNIST1DDataModule
from singd_lightning.data.synthetic import SyntheticDataModule
from singd_lightning.data.text import TextDataModule

#: Data module classes by name.
DATAMODULES: dict[str, type[ImageClassificationDataModule]] = {
    "digits": DigitsDataModule,
    "cifar100": CIFAR100DataModule,
    "imagewoof": ImageWoofDataModule,
    "mnist1d": MNIST1DDataModule,
    "synthetic": SyntheticDataModule,
    "cora": CoraDataModule,
    "imagenet100": ImageNet100DataModule,
    "text": TextDataModule,
}


def create_datamodule(name: str, **kwargs) -> ImageClassificationDataModule:
    """Build a registered data module.

    Args:
        name: A key of :data:`DATAMODULES`.
        **kwargs: Constructor arguments of that data module.

    Raises:
        ValueError: If ``name`` is not registered; the message lists valid names.
    """
    try:
        cls = DATAMODULES[name]
    except KeyError:
        raise ValueError(
            f"Unknown data module {name!r}. Valid names: {', '.join(sorted(DATAMODULES))}"
        ) from None
    return cls(**kwargs)


__all__ = [
    "DATAMODULES",
    "CIFAR100DataModule",
    "CoraDataModule",
    "DatasetNotFoundError",
    "DigitsDataModule",
    "ImageClassificationDataModule",
    "ImageNet100DataModule",
    "ImageWoofDataModule",
    "MNIST1DDataModule",
    "SyntheticDataModule",
    "TextDataModule",
    "create_datamodule",
]
