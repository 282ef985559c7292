"""The text workload in the app: experiment=text_gpt for a few steps, bits per byte,
the loss_average the Kronecker methods get from the data, and the classification
step generalised to logits (..., C) with masked targets."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from singd_lightning.app.errors import ConfigError
from singd_lightning.app.module import IGNORE_INDEX, ImageClassifier
from singd_lightning.app.pipeline import build_model, build_module, objective, train
from tests.app.helpers import FAST, compose_cfg

#: experiment=text_gpt, shrunk to a few steps of a tiny model.
TINY = [*FAST, "data.block_size=16", "model.depth=1", "model.embed_dim=16", "model.num_heads=2"]


def test_text_gpt_experiment_runs_and_logs_bits_per_byte(tmp_path: Path) -> None:
    cfg = compose_cfg(["experiment=text_gpt", "structure=diagonal", "optimizer.T=1", *TINY], output_dir=tmp_path)
    assert (cfg.data.name, cfg.model.name, cfg.task_name) == ("text", "gpt", "text_gpt")
    results = train(cfg)
    assert results["status"] == "ok", results.get("error")
    metrics = results["metrics"]
    assert metrics["val/bpb"] == pytest.approx(metrics["val/loss"] / math.log(2), rel=1e-5)
    assert metrics["test/bpb"] == pytest.approx(metrics["test/loss"] / math.log(2), rel=1e-5)
    assert metrics["val/loss_best"] == pytest.approx(metrics["val/loss"], rel=1e-5)
    assert 0 < metrics["val/loss"] < 8 and 0 <= results["test_acc"] <= 1
    with open(tmp_path / "csv" / "metrics.csv") as f:
        columns = set(next(csv.reader(f)))
    assert {"val/bpb", "val/loss_best", "epoch_test/bpb", "test/bpb", "val/acc"} <= columns
    minimised = compose_cfg(["experiment=text_gpt", "optimized_metric=val/loss_best"])
    assert objective(minimised, results) == metrics["val/loss_best"]


@pytest.mark.parametrize("optimizer", ["singd", "kfac", "adamw"])
def test_loss_average_follows_the_data(optimizer: str) -> None:
    cfg = compose_cfg(["experiment=text_gpt", f"optimizer={optimizer}", *TINY])
    datamodule = SimpleNamespace(num_classes=256, in_chans=1, seq_len=16, vocab_size=256,
                                 loss_average="batch+sequence", byte_level=True)  # fmt: skip
    module = build_module(cfg, build_model(cfg, datamodule), datamodule=datamodule)
    assert module.bits_per_byte
    if optimizer == "adamw":  # takes no loss_average
        assert "loss_average" not in module.optimizer_options
    else:
        assert module.optimizer_options["loss_average"] == "batch+sequence"
    # an explicit choice other than the default is kept; images keep "batch"
    explicit = compose_cfg(["experiment=text_gpt", "optimizer=singd", "optimizer.loss_average=null", *TINY])
    assert build_module(explicit, nn.Linear(2, 256), 256, datamodule).optimizer_options["loss_average"] is None
    images = compose_cfg(["optimizer=singd"])
    assert build_module(images, nn.Linear(2, 10), num_classes=10).optimizer_options["loss_average"] == "batch"


def test_token_models_and_token_data_go_together() -> None:
    tokens = SimpleNamespace(num_classes=256, in_chans=1, seq_len=16, vocab_size=256)
    with pytest.raises(ConfigError, match="model: vgg_small does not take token ids, but data=text gives token ids"):
        build_model(compose_cfg(["data=text", "model=vgg_small"]), tokens)
    images = SimpleNamespace(num_classes=10, in_chans=3)
    with pytest.raises(ConfigError, match="model: gpt takes token ids, but data=digits gives none; use data=text"):
        build_model(compose_cfg(["model=gpt"]), images)


class _Fixed(nn.Module):
    """Returns the logits it holds (times a trainable 1), whatever the input."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits * self.scale


def test_step_flattens_sequences_and_masks_ignored_targets() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 4)
    y = torch.randint(0, 4, (2, 5))
    y[0, :3] = IGNORE_INDEX
    module = ImageClassifier(_Fixed(logits), {"name": "adamw"}, num_classes=4)
    loss, n = module._step((None, y), module.val_acc)
    kept = y != IGNORE_INDEX
    assert n == int(kept.sum()) == 7
    torch.testing.assert_close(loss, F.cross_entropy(logits[kept], y[kept]))
    accuracy = (logits.argmax(-1)[kept] == y[kept]).float().mean()
    torch.testing.assert_close(module.val_acc.compute(), accuracy)
    # every target masked: a zero loss connected to the graph, not NaN
    loss, n = module._step((None, torch.full((2, 5), IGNORE_INDEX)), module.train_acc)
    assert n == 0 and loss.item() == 0.0 and loss.requires_grad
    with pytest.raises(ValueError, match=r"logits \(2, 5, 4\) do not match the targets \(2, 4\)"):
        module._step((None, y[:, :4]), module.val_acc)
    with pytest.raises(ValueError, match="bits_per_byte must be True or False"):
        ImageClassifier(_Fixed(logits), {"name": "adamw"}, num_classes=4, bits_per_byte="yes")
