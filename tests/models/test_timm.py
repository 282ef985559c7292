"""timm models: built by name with the data's classes and channels, trained by the
app (``model=timm model.name=...``), preconditioned by SINGD biases included."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("timm")

from singd_lightning.models import create_timm_model  # noqa: E402
from singd_lightning.optim import SINGD  # noqa: E402

CONF_DIR = Path(__file__).resolve().parents[2] / "singd_lightning" / "conf"
VIT_32 = {"img_size": 32, "patch_size": 4}


def _compose(overrides: list[str], output_dir: Path):
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="test_timm"):
        cfg = compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def test_timm_model_is_sized_by_the_arguments() -> None:
    model = create_timm_model("test_vit", num_classes=7, in_chans=1, kwargs=VIT_32)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    assert model.patch_embed.proj.kernel_size == (4, 4)
    # keys of their own work like kwargs
    other = create_timm_model("test_vit", num_classes=7, in_chans=1, **VIT_32)
    assert other.patch_embed.proj.kernel_size == (4, 4)


@pytest.mark.parametrize(
    ("name", "kwargs", "extra", "message"),
    [
        ("resnet_18", None, {}, r"Unknown timm model 'resnet_18'.*timm.list_models.*Close names: .*resnet18"),
        ("test_vit", {"img_size": 32}, {"img_size": 32}, r"\['img_size'\] given both"),
        ("test_vit", {"num_classes": 3}, {}, r"must not set \['num_classes'\]"),
    ],
)
def test_bad_arguments(name: str, kwargs: dict | None, extra: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_timm_model(name, num_classes=10, kwargs=kwargs, **extra)


def test_singd_preconditions_every_timm_layer_with_its_bias() -> None:
    from timm.optim import param_groups_weight_decay

    model = create_timm_model("test_vit", num_classes=10, kwargs=VIT_32)
    optimizer = SINGD(model, param_groups_weight_decay(model, 0.05), structures="diagonal")
    supported = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert {layer.name for layer in optimizer.layers} == set(supported)
    assert all(layer.has_bias == (supported[layer.name].bias is not None) for layer in optimizer.layers)
    assert any(layer.has_bias for layer in optimizer.layers)


def test_app_trains_a_timm_model(tmp_path: Path) -> None:
    from singd_lightning.app.pipeline import train

    overrides = [
        "model=timm", "model.name=test_vit", "model.kwargs={img_size: 32, patch_size: 8}",
        "structure=diagonal", "trainer=cpu", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "data.batch_size=16", "test=false", "num_threads=1",
        "callbacks.rich_progress_bar=null", "callbacks.model_summary=null", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "eval_test_every_epoch=false",
    ]  # fmt: skip
    results = train(_compose(overrides, tmp_path))
    assert results["status"] == "ok", results.get("error")
    assert results["model"] == "test_vit" and results["global_step"] == 2


def test_app_reports_an_unknown_timm_name_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from singd_lightning.app import train as app_train
    from singd_lightning.app.errors import USER_ERROR_EXIT

    cfg = _compose(["model=timm", "model.name=no_such_net", "trainer=cpu", "test=false"], tmp_path)
    with pytest.raises(SystemExit) as info:
        app_train._task(cfg)
    assert info.value.code == USER_ERROR_EXIT
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "Unknown timm model 'no_such_net'" in errors[0] and "timm.list_models" in errors[0]
