"""Every option of every config group composes with Hydra's compose API and
instantiates (data modules without downloading, models, optimizers, trainers,
loggers, callbacks, launchers and sweepers)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import hydra
import lightning as L
import pytest
import torch
from hydra.errors import MissingConfigException
from hydra.types import RunMode
from omegaconf import OmegaConf

from singd_lightning.app.pipeline import build_callbacks, build_loggers, build_model, build_module, describe_run
from singd_lightning.optim import IKFAC, INGD, KFAC, SINGD
from tests.app.helpers import CONF_DIR, GROUP_OPTIONS, compose_cfg, group_options


def _params(group: str) -> list:
    return [pytest.param(option, id=f"{group}={option}") for option in sorted(GROUP_OPTIONS[group])]


def _small_net(num_classes: int = 10) -> torch.nn.Module:
    from singd_lightning.models import create_model

    return create_model("vgg_small", num_classes=num_classes)


@pytest.mark.parametrize("group", sorted(GROUP_OPTIONS))
def test_group_options_are_the_interface(group: str) -> None:
    assert group_options(group) == GROUP_OPTIONS[group]


def test_default_config() -> None:
    cfg = compose_cfg()
    assert describe_run(cfg) == {
        "optimizer": "singd", "structure": "hierarchical(15,15)", "precision": "32-true",
        "precision_config": "fp32", "model": "vgg_small", "data": "digits",
    }  # fmt: skip
    assert cfg.trainer.precision == "32-true"
    tuned = OmegaConf.load(CONF_DIR / "tuned" / "digits_singd.yaml").optimizer
    assert {key: cfg.optimizer[key] for key in tuned} == dict(tuned)  # the converge suite's best setting
    assert (cfg.optimizer.factor_init, cfg.optimizer.kl_clip) == ("warm", 0.001)


@pytest.mark.parametrize("option", _params("data"))
def test_data_options_instantiate_without_download(option: str, tmp_path: Path) -> None:
    cfg = compose_cfg([f"data={option}", f"paths.data_dir={tmp_path}"])
    datamodule = hydra.utils.instantiate(cfg.data)
    if option in ("cora", "imagenet100"):  # sized by their files, read only when asked
        assert list(tmp_path.iterdir()) == []
        return
    if option == "mnist1d":  # 1-D sequences: a length instead of an image size
        assert (datamodule.num_classes, datamodule.in_chans, datamodule.seq_len) == (10, 1, 40)
    elif option == "text":  # byte sequences: a vocabulary and a length
        assert (datamodule.num_classes, datamodule.vocab_size, datamodule.seq_len) == (256, 256, 128)
    else:
        expected = {"digits": (10, 32), "cifar100": (100, 32), "imagewoof10": (10, 128), "synthetic_cifar": (100, 32)}[option]
        assert (datamodule.num_classes, datamodule.image_size) == expected
        assert datamodule.in_chans == 3
    assert list(tmp_path.iterdir()) == []  # nothing downloaded or written


@pytest.mark.parametrize("option", _params("model"))
def test_model_options_build_and_run(option: str) -> None:
    sequences = option in ("mlp", "cnn1d")  # 1-D models, for data=mnist1d
    cfg = compose_cfg([f"model={option}", *(["data=mnist1d"] if sequences else [])])
    datamodule = hydra.utils.instantiate(cfg.data)
    size = 224 if option == "vit" else 32  # vit: timm's ViT-Tiny for 224 px
    x = torch.randn(2, 1, 40) if sequences else torch.randn(2, 3, size, size)
    if option == "gcn":  # a graph model: sized by a graph's node features, one output row per node
        datamodule = SimpleNamespace(num_classes=10, in_chans=4, num_nodes=2)
        x = (torch.randn(2, 4), torch.eye(2).to_sparse())
    if option == "gpt":  # a token model: next-token logits at every position
        datamodule = SimpleNamespace(num_classes=10, in_chans=1, seq_len=8, vocab_size=10)
        x = torch.randint(0, 10, (2, 8))
    net = build_model(cfg, datamodule)
    with torch.no_grad():
        out = net(x)
    assert out.shape == ((2, 8, 10) if option == "gpt" else (2, 10))


@pytest.mark.parametrize("option", _params("optimizer"))
def test_optimizer_options_build_through_the_plugin(option: str) -> None:
    cfg = compose_cfg([f"optimizer={option}", "structure=diagonal"])
    module = build_module(cfg, _small_net())
    optimizer = module.configure_optimizers()["optimizer"]
    expected = {"singd": SINGD, "ingd": INGD, "ikfac": IKFAC, "kfac": KFAC,
                "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[option]  # fmt: skip
    assert isinstance(optimizer, expected)
    assert optimizer.param_groups[0]["lr"] == cfg.optimizer.lr
    # one real step
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    torch.nn.functional.cross_entropy(module(x), y).backward()
    optimizer.step()
    if option == "singd":
        assert describe_run(cfg)["structure"] == "diagonal"
    if option in ("ingd", "ikfac", "kfac"):
        assert describe_run(cfg)["structure"] == "dense"


@pytest.mark.parametrize("option", _params("structure"))
def test_structure_options_drive_singd(option: str) -> None:
    cfg = compose_cfg([f"structure={option}"])
    options = OmegaConf.to_container(cfg.optimizer, resolve=True)
    k_spec, c_spec = options["structures"]
    assert k_spec["name"] == c_spec["name"] == option
    module = build_module(cfg, _small_net())
    optimizer = module.configure_optimizers()["optimizer"]
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    torch.nn.functional.cross_entropy(module(x), y).backward()
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_structure_sizes_and_factors_apart() -> None:
    cfg = compose_cfg(["structure=block_diagonal", "structure.block_size=32", "structure.C=diagonal"])
    k_spec, c_spec = OmegaConf.to_container(cfg.optimizer.structures, resolve=True)
    assert k_spec == {"name": "block_diagonal", "block_size": 32}
    assert c_spec == "diagonal"
    assert describe_run(cfg)["structure"] == "K=block_diagonal(32),C=diagonal"
    # a factor is replaced by a name or a sized alias of the reference package
    cfg = compose_cfg(["structure=hierarchical", "structure.K=block16diagonal", "structure.C=hierarchical8_4"])
    assert OmegaConf.to_container(cfg.optimizer.structures, resolve=True) == ["block16diagonal", "hierarchical8_4"]
    module = build_module(cfg, _small_net())
    optimizer = module.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, SINGD)
    cfg = compose_cfg(["structure=hierarchical", "structure.K=dense"])
    assert OmegaConf.to_container(cfg.optimizer.structures, resolve=True) == ["dense", "dense"]  # C follows K
    cfg = compose_cfg(["structure=hierarchical", "structure.k1=4", "structure.k2=2"])
    assert OmegaConf.to_container(cfg.optimizer.structures, resolve=True)[1] == {
        "name": "hierarchical", "k1": 4, "k2": 2,
    }  # fmt: skip


@pytest.mark.parametrize("option", _params("precision"))
def test_precision_options(option: str) -> None:
    cfg = compose_cfg([f"precision={option}", "trainer=cpu", "logger=csv", "paths.output_dir=."])
    trainer_precision = {"fp32": "32-true", "bf16": "bf16-mixed", "bf16-fp32-factors": "bf16-mixed",
                         "bf16-true": "bf16-true", "fp16": "16-mixed"}
    assert cfg.trainer.precision == trainer_precision[option]
    dtype = OmegaConf.to_container(cfg.optimizer, resolve=True)["preconditioner_dtype"]
    assert dtype == {"bf16": ["bf16", "bf16"], "bf16-fp32-factors": ["fp32", "fp32"]}.get(option, [None, None])
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False)
    if option == "fp16":  # Lightning has no fp16 autocast on a CPU: it falls back to bf16
        assert trainer.precision == ("16-mixed" if torch.cuda.is_available() else "bf16-mixed")
    else:
        assert trainer.precision == trainer_precision[option]


@pytest.mark.parametrize("option", _params("scheduler"))
def test_scheduler_options(option: str) -> None:
    cfg = compose_cfg([f"scheduler={option}", "optimizer=sgd"])
    config = build_module(cfg, _small_net()).configure_optimizers()
    assert isinstance(config["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.LRScheduler)


@pytest.mark.parametrize("option", _params("trainer"))
def test_trainer_options(option: str, tmp_path: Path) -> None:
    overrides = [f"trainer={option}", f"paths.output_dir={tmp_path}"]
    if option in ("gpu", "ddp", "fsdp") and not torch.cuda.is_available():
        cfg = compose_cfg(overrides)
        assert cfg.trainer.accelerator == "gpu"
        overrides += ["trainer.accelerator=cpu"]
        if option == "ddp":
            overrides += ["trainer.devices=2", "trainer.sync_batchnorm=false"]
        if option == "fsdp":
            overrides += ["trainer.devices=2"]
    cfg = compose_cfg(overrides)
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False)
    assert isinstance(trainer, L.Trainer)
    if option == "ddp":
        assert type(trainer.strategy).__name__ == "DDPStrategy"
        assert trainer.num_devices == cfg.trainer.devices
    if option == "fsdp":  # FSDP2 over all devices, no tensor parallelism
        assert type(trainer.strategy).__name__ == "ModelParallelStrategy"
        assert trainer.num_devices == cfg.trainer.devices
        assert (trainer.strategy._data_parallel_size, trainer.strategy._tensor_parallel_size) == (cfg.trainer.devices, 1)


@pytest.mark.parametrize("option", _params("logger"))
def test_logger_options(option: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = compose_cfg([f"logger={option}"], output_dir=tmp_path)
    loggers = build_loggers(cfg.logger)
    names = sorted(type(lg).__name__ for lg in loggers)
    expected = {"csv": ["CSVLogger"], "wandb": ["CSVLogger", "WandbLogger"],
                "many_loggers": ["CSVLogger", "WandbLogger"]}[option]  # fmt: skip
    assert names == expected
    assert loggers[0].log_dir.startswith(str(tmp_path))  # CSV always, in the run dir


@pytest.mark.parametrize("option", _params("callbacks"))
def test_callbacks_options(option: str, tmp_path: Path) -> None:
    cfg = compose_cfg([f"callbacks={option}"], output_dir=tmp_path)
    names = {type(cb).__name__ for cb in build_callbacks(cfg.callbacks)}
    assert {"RichProgressBar", "LearningRateMonitor", "PerformanceMonitor", "DivergenceDetector",
            "SINGDDiagnostics"} <= names  # fmt: skip
    assert ("ModelCheckpoint" in names) == (option == "with_checkpoint")
    assert cfg.trainer.enable_checkpointing == (option == "with_checkpoint")


@pytest.mark.parametrize("option", _params("launcher"))
def test_launcher_options(option: str) -> None:
    cfg = compose_cfg([f"launcher={option}", "trainer=ddp", "trainer.devices=4"], hydra=True)
    launcher = cfg.hydra.launcher
    if option == "local":
        assert launcher._target_.endswith("BasicLauncher")
    else:
        assert launcher._target_.endswith("SlurmLauncher")
        # one SLURM task per device, so every task is one Lightning rank
        assert launcher.tasks_per_node == cfg.trainer.devices == 4
        assert launcher.gpus_per_node == 4
        assert launcher.nodes == cfg.trainer.num_nodes


@pytest.mark.parametrize("option", _params("experiment"))
def test_experiment_options(option: str, tmp_path: Path) -> None:
    cfg = compose_cfg([f"experiment={option}", f"paths.data_dir={tmp_path}"])
    data, model = option.split("_")
    if data in ("cora", "imagenet100"):
        pytest.skip("sized by the data's files: tests/app/test_app_paper_experiments.py trains it on small ones")
    if data == "text":
        pytest.skip("a CPU-sized setting, not a paper one: tests/app/test_app_text.py runs it")
    datamodule = hydra.utils.instantiate(cfg.data)
    net = build_model(cfg, datamodule)
    assert cfg.task_name == option
    assert cfg.trainer.max_epochs >= 100
    if data == "cifar100":
        assert datamodule.num_classes == 100 and datamodule.image_size == 32
    else:
        assert datamodule.num_classes == 10 and datamodule.image_size == 128
        # the 128 px variant of the model
        assert cfg.model.name in ("vgg16", "convmixer_256_16", "cct_7_7x2_128", "swin_tiny_128", "gcvit_xxtiny_128",
                                  "repvit_m0_9", "hdvt_tiny_128")
    assert net.num_classes == datamodule.num_classes
    assert sum(p.numel() for p in net.parameters()) > 500_000  # paper sizes
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option", _params("hparams_search"))
def test_hparams_search_options(option: str) -> None:
    cfg = compose_cfg([f"hparams_search={option}"], hydra=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.sampler._target_ == "optuna.samplers.RandomSampler"
    assert sweeper.direction == "maximize"
    assert cfg.hydra.mode == RunMode.MULTIRUN
    assert cfg.optimizer.name == option
    assert sweeper.params, "empty search space"
    for key in sweeper.params:
        assert OmegaConf.select(cfg, key) is not None, f"{key} is not in the {option} config"


@pytest.mark.parametrize("optimizer", _params("optimizer"))
def test_tuned_digits_values(optimizer: str) -> None:
    cfg = compose_cfg([f"optimizer={optimizer}"])
    tuned = OmegaConf.load(CONF_DIR / "tuned" / f"digits_{optimizer}.yaml").optimizer
    assert "lr" in tuned and {key: cfg.optimizer[key] for key in tuned} == dict(tuned)
    # the command line still wins, and other data sets keep the method's default
    assert compose_cfg([f"optimizer={optimizer}", "optimizer.lr=0.5"]).optimizer.lr == 0.5
    default = OmegaConf.load(CONF_DIR / "optimizer" / f"{optimizer}.yaml").lr
    assert compose_cfg([f"optimizer={optimizer}", "data=cifar100"]).optimizer.lr == default


@pytest.mark.parametrize("group", ["optimizer", "structure", "precision", "model", "data", "experiment"])
def test_unknown_option_lists_the_valid_ones(group: str) -> None:
    with pytest.raises(MissingConfigException) as info:
        compose_cfg([f"{group}=no_such_option"])
    message = str(info.value)
    assert f"Could not find '{group}/no_such_option'" in message
    for option in GROUP_OPTIONS[group]:
        assert f"\t{option}\n" in message + "\n"


def test_wandb_mode_auto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from singd_lightning.app.hydra_utils import resolve_wandb_offline

    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    assert resolve_wandb_offline("auto") is True  # no account: offline
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_offline("auto") is False  # logged in: online
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_wandb_offline("auto") is True  # forced
    assert resolve_wandb_offline(False) is False
    with pytest.raises(ValueError, match="offline"):
        resolve_wandb_offline("sometimes")
