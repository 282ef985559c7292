"""The image-classification ``LightningModule`` the app trains.

The optimizer comes from the Lightning plugin (:func:`singd_lightning.lightning.configure_singd`),
so every optimizer of the comparison (SINGD, INGD, IKFAC, KFAC, AdamW, SGD) is built the
same way a user would build it in their own module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer
from torchmetrics import MaxMetric
from torchmetrics.classification import MulticlassAccuracy

from singd_lightning.lightning import configure_singd

#: Index of the test set among the validation loaders when the test error is
#: tracked every epoch (see :func:`singd_lightning.app.train.build_datamodule`).
EPOCH_TEST_LOADER = 1


def _as_tuples(value: Any) -> Any:
    """Lists (as Hydra gives them) to tuples, recursively; mappings to dicts."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _as_tuples(v) for k, v in value.items()}
    return value


class ImageClassifier(L.LightningModule):
    """Cross-entropy classifier around any ``nn.Module`` that maps images to logits.

    Logged metrics: ``train/loss`` (step and epoch), ``train/acc``, ``val/loss``,
    ``val/acc``, ``val/acc_best``, ``test/loss``, ``test/acc`` and, when the test set
    is evaluated every epoch, ``epoch_test/loss`` and ``epoch_test/acc``. The
    accuracies are torchmetrics' ``MulticlassAccuracy`` (micro: the fraction of
    correct predictions, synchronised across processes), the best validation accuracy
    a ``MaxMetric``.

    Args:
        net: The network.
        optimizer: ``{"name": <singd|ingd|ikfac|kfac|adamw|sgd>, **options}``; passed
            to :func:`~singd_lightning.lightning.configure_singd`.
        scheduler: A callable ``optimizer -> LRScheduler`` (e.g. a
            ``functools.partial``), or None for a constant learning rate.
        label_smoothing: Label smoothing of the training loss.
        num_classes: Number of classes; None: ``net.num_classes``.

    Raises:
        ValueError: ``optimizer`` has no ``name``, or the number of classes is unknown.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Mapping[str, Any],
        scheduler: Callable[[Optimizer], Any] | None = None,
        label_smoothing: float = 0.0,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        options = dict(optimizer)
        if "name" not in options:
            raise ValueError(f"optimizer needs a 'name' key, got {sorted(options)}")
        if num_classes is None:
            num_classes = getattr(net, "num_classes", None)
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2 (or the net's num_classes attribute), got {num_classes!r}")
        # logger=False: the app logs its whole config itself (see pipeline.train)
        self.save_hyperparameters({"optimizer": options, "label_smoothing": label_smoothing}, logger=False)
        self.net = net
        self.optimizer_name = str(options.pop("name"))
        self.optimizer_options = {k: _as_tuples(v) for k, v in options.items()}
        self.scheduler = scheduler
        self.label_smoothing = label_smoothing
        self.num_classes = num_classes
        # one metric object per logged name: Lightning computes and resets each per epoch
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.epoch_test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc_best = MaxMetric()

    @property
    def best_val_acc(self) -> float:
        """The best validation accuracy of the completed epochs; NaN before the first."""
        if self.val_acc_best.update_count == 0:
            return float("nan")
        return float(self.val_acc_best.compute())

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def _step(
        self, batch: tuple[Tensor, Tensor], accuracy: MulticlassAccuracy, smoothing: float = 0.0
    ) -> tuple[Tensor, int]:
        """The loss of ``batch``; updates ``accuracy`` with its predictions."""
        x, y = batch
        logits = self(x)
        if y.is_floating_point() and y.shape == logits.shape:
            # Soft targets (class probabilities, from mixup/CutMix): the loss takes
            # them as they are; the accuracy counts their most likely class.
            loss = F.cross_entropy(logits.float(), y, label_smoothing=smoothing)
            accuracy.update(logits.detach().argmax(dim=-1), y.argmax(dim=-1))
            return loss, y.shape[0]
        loss = F.cross_entropy(logits.float(), y, label_smoothing=smoothing)
        accuracy.update(logits.detach().argmax(dim=-1), y)
        return loss, y.shape[0]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss, n = self._step(batch, self.train_acc, self.label_smoothing)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        test = dataloader_idx == EPOCH_TEST_LOADER
        prefix = "epoch_test" if test else "val"
        loss, n = self._step(batch, self.epoch_test_acc if test else self.val_acc)
        self.log(f"{prefix}/loss", loss, sync_dist=True, batch_size=n, add_dataloader_idx=False)
        self.log(
            f"{prefix}/acc", self.epoch_test_acc if test else self.val_acc, add_dataloader_idx=False,
            prog_bar=not test,
        )

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or self.val_acc.update_count == 0:
            return
        # computed (and synchronised) before Lightning resets val_acc for the next epoch
        self.val_acc_best.update(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute())

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        loss, n = self._step(batch, self.test_acc)
        self.log("test/loss", loss, sync_dist=True, batch_size=n)
        self.log("test/acc", self.test_acc)

    def configure_optimizers(self) -> dict[str, Any]:
        return configure_singd(
            self, optimizer=self.optimizer_name, scheduler=self.scheduler, **self.optimizer_options
        )

    # Checkpoints keep the best validation accuracy so a resumed run reports it.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["best_val_acc"] = self.best_val_acc

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.val_acc_best.reset()
        best = float(checkpoint.get("best_val_acc", float("nan")))
        if math.isfinite(best):
            self.val_acc_best.update(best)


def optimizer_state_bytes(optimizer: Optimizer | Any) -> int:
    """Bytes of every tensor in ``optimizer.state_dict()`` (momenta, factors, ...)."""
    try:
        state = optimizer.state_dict()
    except Exception:  # a wrapper without state_dict: count nothing rather than fail a run
        return 0
    seen: set[int] = set()

    def walk(obj: Any) -> int:
        if isinstance(obj, Tensor):
            if id(obj) in seen:
                return 0
            seen.add(id(obj))
            return obj.numel() * obj.element_size()
        if isinstance(obj, Mapping):
            return sum(walk(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(walk(v) for v in obj)
        return 0

    return walk(state)


__all__ = ["EPOCH_TEST_LOADER", "ImageClassifier", "optimizer_state_bytes"]
