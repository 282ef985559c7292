"""The paper experiments compose with the authors' recipe: the optimizer options of
``recipe=paper`` for the Kronecker methods only, each family's schedule, augmentation
and label smoothing; fp32 factors under bf16 autocast."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from singd_lightning.app.pipeline import build_module
from singd_lightning.lightning.schedulers import WarmupCosineLR
from singd_lightning.optim import IKFAC, INGD, KFAC, SINGD
from singd_lightning.optim.schedules import AUTHORS_WARMUPS, LrCovWarmup
from tests.app.helpers import compose_cfg

#: The experiments of this recipe: per model family its schedule and augmentation.
EXPERIMENTS = {
    "cifar100_vgg": "cnn", "cifar100_convmixer": "cnn", "imagewoof10_vgg": "cnn", "imagewoof10_convmixer": "cnn",
    "cifar100_cct": "cct", "imagewoof10_cct": "cct", "cifar100_swin": "swin", "imagewoof10_swin": "swin",
}  # fmt: skip


def _small_net():
    from singd_lightning.models import create_model

    return create_model("vgg_small", num_classes=10)


def _configured(cfg):
    return build_module(cfg, _small_net()).configure_optimizers()


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_paper_experiment_recipe(experiment: str, tmp_path: Path) -> None:
    cfg = compose_cfg([f"experiment={experiment}", "optimizer=kfac", f"paths.data_dir={tmp_path}"])
    family = EXPERIMENTS[experiment]
    assert cfg.recipe.name == "paper"
    configured = _configured(cfg)
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, KFAC)
    assert (group["damping_mode"], group["stat_decay"], group["factor_init"]) == ("per_factor", None, "identity")
    assert (group["weight_decay_start"], group["fallback_weight_decay"]) == ("auto", None)
    # the authors' KFAC β₁ warm-up, through stat_decay = 1 − lr_cov
    assert group["lr_cov"] == LrCovWarmup(1e-2, *AUTHORS_WARMUPS["authors_kfac_warmup"])
    datamodule = hydra.utils.instantiate(cfg.data)
    augmentation = datamodule.augmentation
    if family == "cnn":
        assert cfg.trainer.max_epochs == 120 and cfg.label_smoothing == 0.0
        assert isinstance(scheduler, torch.optim.lr_scheduler.MultiStepLR)
        assert dict(scheduler.milestones) == {40: 1, 80: 1} and scheduler.gamma == 0.1
        assert augmentation.auto_augment is None and datamodule.batch_mixer is None
    else:
        assert isinstance(scheduler, WarmupCosineLR) and cfg.label_smoothing == 0.1
        assert scheduler.max_epochs == cfg.trainer.max_epochs
        policy = "cifar10" if experiment.startswith("cifar100") else "imagenet"
        assert augmentation.auto_augment == policy
    if family == "cct":
        assert (cfg.trainer.max_epochs, scheduler.warmup_epochs, scheduler.warmup) == (200, 5, "reciprocal")
        assert datamodule.batch_mixer is None and augmentation.random_erasing == 0.0
    if family == "swin":
        assert (cfg.trainer.max_epochs, scheduler.warmup_epochs, scheduler.warmup) == (100, 10, "linear")
        assert augmentation.random_erasing == 0.25 and datamodule.batch_mixer is not None
        assert (augmentation.mixup_alpha, augmentation.cutmix_alpha, augmentation.mix_prob) == (1.0, 1.0, 0.5)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "name, cls", [("singd", SINGD), ("ingd", INGD), ("ikfac", IKFAC), ("adamw", torch.optim.AdamW),
                  ("sgd", torch.optim.SGD)],
)
def test_recipe_changes_only_the_kronecker_methods(name: str, cls: type) -> None:
    cfg = compose_cfg(["experiment=cifar100_vgg", f"optimizer={name}"])
    optimizer = _configured(cfg)["optimizer"]
    assert isinstance(optimizer, cls)
    if name in ("adamw", "sgd"):
        assert "weight_decay_start" not in cfg.optimizer
    else:
        group = optimizer.param_groups[0]
        assert (group["weight_decay_start"], group["fallback_weight_decay"]) == ("auto", None)
        warmup = AUTHORS_WARMUPS["authors_kfac_warmup" if name == "kfac" else "authors_warmup"]
        assert group["lr_cov"] == LrCovWarmup(cfg.optimizer.lr_cov, *warmup)
        # no KL clip with the recipe; without it, the library's default clip
        assert (group["factor_init"], group["kl_clip"]) == ("identity", None)
        plain = _configured(compose_cfg(["experiment=cifar100_vgg", f"optimizer={name}", "recipe=none"]))
        plain = plain["optimizer"].param_groups[0]
        assert (plain["factor_init"], plain["kl_clip"]) == ("identity", 1e-3)


def test_recipe_none_keeps_todays_defaults_and_overrides_win() -> None:
    cfg = compose_cfg(["experiment=cifar100_vgg", "optimizer=kfac", "recipe=none"])
    group = _configured(cfg)["optimizer"].param_groups[0]
    assert (group["damping_mode"], group["stat_decay"], group["weight_decay_start"]) == ("split", 0.95, 0)
    cfg = compose_cfg(["experiment=cifar100_vgg", "optimizer=kfac", "optimizer.damping_mode=split"])
    assert cfg.optimizer.damping_mode == "split" and cfg.optimizer.stat_decay is None
    # outside the experiments, by name
    assert compose_cfg(["recipe=paper"]).optimizer.weight_decay_start == "auto"


def test_bf16_with_fp32_factors_builds_float32_factors() -> None:
    cfg = compose_cfg(["precision=bf16-fp32-factors", "optimizer=kfac", "trainer=cpu"])
    assert cfg.trainer.precision == "bf16-mixed"
    optimizer = _configured(cfg)["optimizer"]
    assert optimizer.param_groups[0]["preconditioner_dtype"] == ("float32", "float32")
    state = next(iter(optimizer.layer_state.values()))
    assert state["A"].dtype == state["G"].dtype == torch.float32
    bf16 = _configured(compose_cfg(["precision=bf16", "optimizer=kfac"]))["optimizer"]
    assert next(iter(bf16.layer_state.values()))["A"].dtype == torch.bfloat16
    assert OmegaConf.to_container(cfg.optimizer, resolve=True)["preconditioner_dtype"] == ["fp32", "fp32"]


def test_swin_recipe_trains_on_fake_cifar100(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """AutoAugment, random erasing, mixup/CutMix and label smoothing through the app,
    with the authors' KFAC."""
    from singd_lightning.app.pipeline import train
    from tests.app.helpers import FAST
    from tests.data.test_data import write_fake_cifar100

    write_fake_cifar100(tmp_path / "data", monkeypatch, n_train=24, n_test=8)
    cfg = compose_cfg(
        ["experiment=cifar100_swin", "model.name=swin_nano", "optimizer=kfac", f"paths.data_dir={tmp_path / 'data'}",
         "data.val_size=8", "data.download=false", "data.num_workers=0", "data.pin_memory=false", *FAST,
         "data.batch_size=8", "trainer.max_epochs=1", "scheduler.warmup_epochs=0", "eval_test_every_epoch=false"],
        output_dir=tmp_path / "run",
    )  # fmt: skip
    results = train(cfg)
    assert results["status"] == "ok", results.get("error")
    assert results["test_acc"] is not None


@pytest.mark.parametrize("name", ["singd", "ingd", "ikfac"])
def test_batch_layers_is_an_optimizer_option(name: str) -> None:
    assert _configured(compose_cfg([f"optimizer={name}"]))["optimizer"].batch_layers is None  # CUDA only
    optimizer = _configured(compose_cfg([f"optimizer={name}", "optimizer.batch_layers=true"]))["optimizer"]
    assert optimizer.batch_layers is True
