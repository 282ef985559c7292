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
from torchmetrics import MaxMetric, MeanMetric, MinMetric
from torchmetrics.classification import MulticlassAccuracy

from singd_lightning.lightning import configure_singd
from singd_lightning.lightning.sharded import shard_for_strategy

#: Index of the test set among the validation loaders when the test error is
#: tracked every epoch (see :func:`singd_lightning.app.train.build_datamodule`).
EPOCH_TEST_LOADER = 1
#: A target with this value is masked: it counts in neither loss nor accuracy
#: (``F.cross_entropy``'s default ``ignore_index``).
IGNORE_INDEX = -100


def _as_tuples(value: Any) -> Any:
    """Lists (as Hydra gives them) to tuples, recursively; mappings to dicts."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _as_tuples(v) for k, v in value.items()}
    return value


class ImageClassifier(L.LightningModule):
    """Cross-entropy classifier around any ``nn.Module`` that maps inputs to logits.

    The logits may have any leading shape: logits ``(..., C)`` go with targets
    ``(...)`` (an image's class ``(N,)``, a sequence's next tokens ``(N, S)``, a
    graph's nodes), every target a term of the mean loss. Targets equal to
    :data:`IGNORE_INDEX` (-100) are masked: they count in neither the loss nor the
    accuracy.

    Logged metrics: ``train/loss`` (step and epoch), ``train/acc``, ``val/loss``,
    ``val/acc``, ``val/acc_best``, ``val/loss_best``, ``test/loss``, ``test/acc``
    and, when the test set is evaluated every epoch, ``epoch_test/loss`` and
    ``epoch_test/acc``; with ``bits_per_byte`` also ``val/bpb``, ``test/bpb`` and
    ``epoch_test/bpb`` (the loss over ln 2). The accuracies are torchmetrics'
    ``MulticlassAccuracy`` (micro: the fraction of correct predictions, e.g. of next
    bytes, synchronised across processes), the best validation accuracy a
    ``MaxMetric``, the best validation loss a ``MinMetric``. Epoch losses are means
    over the targets (not the batches).

    Args:
        net: The network.
        optimizer: ``{"name": <singd|ingd|ikfac|kfac|adamw|sgd>, **options}``; passed
            to :func:`~singd_lightning.lightning.configure_singd`.
        scheduler: A callable ``optimizer -> LRScheduler`` (e.g. a
            ``functools.partial``), or None for a constant learning rate.
        label_smoothing: Label smoothing of the training loss.
        num_classes: Number of classes; None: ``net.num_classes``.
        bits_per_byte: Also log the losses in bits (per byte, for byte-level
            language models).

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
        bits_per_byte: bool = False,
    ) -> None:
        super().__init__()
        options = dict(optimizer)
        if "name" not in options:
            raise ValueError(f"optimizer needs a 'name' key, got {sorted(options)}")
        if num_classes is None:
            num_classes = getattr(net, "num_classes", None)
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2 (or the net's num_classes attribute), got {num_classes!r}")
        if not isinstance(bits_per_byte, bool):
            raise ValueError(f"bits_per_byte must be True or False, got {bits_per_byte!r}")
        # logger=False: the app logs its whole config itself (see pipeline.train)
        self.save_hyperparameters({"optimizer": options, "label_smoothing": label_smoothing}, logger=False)
        self.net = net
        self.optimizer_name = str(options.pop("name"))
        self.optimizer_options = {k: _as_tuples(v) for k, v in options.items()}
        self.scheduler = scheduler
        self.label_smoothing = label_smoothing
        self.num_classes = num_classes
        self.bits_per_byte = bits_per_byte
        # one metric object per logged name: Lightning computes and resets each per epoch
        accuracy = dict(average="micro", ignore_index=IGNORE_INDEX)
        self.train_acc = MulticlassAccuracy(num_classes, **accuracy)
        self.val_acc = MulticlassAccuracy(num_classes, **accuracy)
        self.epoch_test_acc = MulticlassAccuracy(num_classes, **accuracy)
        self.test_acc = MulticlassAccuracy(num_classes, **accuracy)
        self.val_acc_best = MaxMetric()
        self.val_loss_best = MinMetric()
        # the epoch's validation loss, a mean over targets (for val/loss_best)
        self.val_loss_mean = MeanMetric()

    @property
    def best_val_acc(self) -> float:
        """The best validation accuracy of the completed epochs; NaN before the first."""
        if self.val_acc_best.update_count == 0:
            return float("nan")
        return float(self.val_acc_best.compute())

    @property
    def best_val_loss(self) -> float:
        """The lowest validation loss of the completed epochs; NaN before the first."""
        if self.val_loss_best.update_count == 0:
            return float("nan")
        return float(self.val_loss_best.compute())

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def _step(
        self, batch: tuple[Tensor, Tensor], accuracy: MulticlassAccuracy, smoothing: float = 0.0
    ) -> tuple[Tensor, int]:
        """The mean loss over the targets of ``batch`` that are not :data:`IGNORE_INDEX`,
        and their number; updates ``accuracy`` with the predictions."""
        x, y = batch
        logits = self(x)
        if y.is_floating_point() and y.shape == logits.shape:
            # Soft targets (class probabilities, from mixup/CutMix): the loss takes
            # them as they are; the accuracy counts their most likely class.
            loss = F.cross_entropy(logits.float(), y, label_smoothing=smoothing)
            accuracy.update(logits.detach().argmax(dim=-1), y.argmax(dim=-1))
            return loss, y.shape[0]
        if logits.shape[:-1] != y.shape:
            raise ValueError(
                f"the network's logits {tuple(logits.shape)} do not match the targets {tuple(y.shape)}: "
                "logits (..., num_classes) need targets (...)."
            )
        logits, y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=smoothing, ignore_index=IGNORE_INDEX)
        accuracy.update(logits.detach().argmax(dim=-1), y)
        # Lightning weights the batches' losses by this in the epoch mean.
        count = int((y != IGNORE_INDEX).sum())
        if count == 0:  # every target masked: a zero loss, not the NaN of an empty mean
            loss = logits.float().sum() * 0.0
        return loss, count

    def _log_bits(self, name: str, loss: Tensor, n: int) -> None:
        if self.bits_per_byte:
            self.log(name, loss.detach() / math.log(2), sync_dist=True, batch_size=n, add_dataloader_idx=False)

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
        self._log_bits(f"{prefix}/bpb", loss, n)
        self.log(
            f"{prefix}/acc", self.epoch_test_acc if test else self.val_acc, add_dataloader_idx=False,
            prog_bar=not test,
        )
        if not test and n > 0:
            self.val_loss_mean.update(loss.detach(), weight=n)

    def on_validation_epoch_end(self) -> None:
        val_loss = self.val_loss_mean.compute() if self.val_loss_mean.update_count else None
        self.val_loss_mean.reset()
        if self.trainer.sanity_checking or self.val_acc.update_count == 0:
            return
        # computed (and synchronised) before Lightning resets val_acc for the next epoch
        self.val_acc_best.update(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute())
        if val_loss is not None:
            self.val_loss_best.update(val_loss)
            self.log("val/loss_best", self.val_loss_best.compute())

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        loss, n = self._step(batch, self.test_acc)
        self.log("test/loss", loss, sync_dist=True, batch_size=n)
        self._log_bits("test/bpb", loss, n)
        self.log("test/acc", self.test_acc)

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (``trainer=fsdp``), shard the network with
        FSDP2 (see :func:`~singd_lightning.lightning.sharded.shard_for_strategy`)."""
        shard_for_strategy(self.net, self.trainer.strategy)

    def configure_optimizers(self) -> dict[str, Any]:
        return configure_singd(
            self, optimizer=self.optimizer_name, scheduler=self.scheduler, **self.optimizer_options
        )

    # Checkpoints keep the best validation accuracy and loss so a resumed run reports them.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["best_val_acc"] = self.best_val_acc
        checkpoint["best_val_loss"] = self.best_val_loss

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        for metric, key in ((self.val_acc_best, "best_val_acc"), (self.val_loss_best, "best_val_loss")):
            metric.reset()
            best = float(checkpoint.get(key, float("nan")))
            if math.isfinite(best):
                metric.update(best)


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


__all__ = ["EPOCH_TEST_LOADER", "IGNORE_INDEX", "ImageClassifier", "optimizer_state_bytes"]
