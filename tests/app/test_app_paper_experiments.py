"""The experiments of the paper's remaining models (GC-ViT, RepViT, HDVT on CIFAR-100
and ImageWoof-10; the GCN on Cora; the ViT on ImageNet-100): each composes with its
paper-size model and trains a few steps with the test-size one, on small copies of
the data written in the real formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import open_dict

from singd_lightning.app.errors import ConfigError
from singd_lightning.app.pipeline import build_datamodule, build_model, train
from tests.app.helpers import FAST, compose_cfg
from tests.data.test_data import write_fake_cifar100, write_fake_imagewoof
from tests.paper_data import write_image_folder, write_planetoid

LOCAL = ["data.download=false", "data.num_workers=0", "data.pin_memory=false", "num_threads=1"]
#: experiment -> (paper-size model, test-size model)
IMAGE_EXPERIMENTS = {
    "cifar100_gcvit": ("gcvit_xxtiny_32", "gcvit_nano"),
    "cifar100_repvit": ("repvit_m0_9", "repvit_nano"),
    "cifar100_hdvt": ("hdvt_tiny_32", "hdvt_nano"),
    "imagewoof10_gcvit": ("gcvit_xxtiny_128", "gcvit_nano"),
    "imagewoof10_repvit": ("repvit_m0_9", "repvit_nano"),
    "imagewoof10_hdvt": ("hdvt_tiny_128", "hdvt_nano"),
}


def _train(cfg, run_dir: Path) -> dict:
    results = train(cfg)
    assert results["status"] == "ok", results.get("error")
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["global_step"] >= 1 and saved["test_acc"] is not None
    return saved


@pytest.mark.parametrize("experiment", sorted(IMAGE_EXPERIMENTS))
def test_image_experiment_trains(experiment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paper_model, test_model = IMAGE_EXPERIMENTS[experiment]
    data_dir = tmp_path / "data"
    if experiment.startswith("cifar100"):
        write_fake_cifar100(data_dir, monkeypatch, n_train=20, n_test=4)
        sizes = ["data.val_size=4"]
    else:
        write_fake_imagewoof(data_dir, n_train=1, n_val=1)
        sizes = ["data.val_size=2", "data.image_size=32"]  # the 32 px test-size model
    overrides = [f"experiment={experiment}", f"paths.data_dir={data_dir}", *LOCAL, *sizes]
    assert compose_cfg(overrides).model.name == paper_model
    run = tmp_path / "run"
    # (the one-epoch run leaves no room for the recipe's warm-up)
    cfg = compose_cfg([*overrides, *FAST, "data.batch_size=4", f"model.name={test_model}", "scheduler.warmup_epochs=0"],
                      output_dir=run)
    saved = _train(cfg, run)
    assert saved["model"] == test_model and saved["optimizer"] == "singd"


def test_cora_gcn_trains_full_batch(tmp_path: Path) -> None:
    checksums = write_planetoid(tmp_path / "data" / "planetoid")
    run = tmp_path / "run"
    cfg = compose_cfg(
        ["experiment=cora_gcn", f"paths.data_dir={tmp_path / 'data'}", *LOCAL,
         *[o for o in FAST if not o.startswith("data.")], "trainer.max_epochs=3"],
        output_dir=run,
    )  # fmt: skip
    with open_dict(cfg):
        cfg.data.checksums = checksums  # the test graph's, instead of the real Cora's
    assert (cfg.model.name, cfg.optimizer.weight_decay) == ("gcn", 5e-4)
    saved = _train(cfg, run)
    assert saved["global_step"] == 3  # one step per epoch: the whole graph
    assert saved["num_params"] == 8 * 16 + 16 + 16 * 3 + 3


def test_image_model_on_the_graph_is_refused(tmp_path: Path) -> None:
    checksums = write_planetoid(tmp_path / "planetoid")
    cfg = compose_cfg(["experiment=cora_gcn", f"paths.data_dir={tmp_path}", "model=hdvt", *LOCAL])
    with open_dict(cfg):
        cfg.data.checksums = checksums
    with pytest.raises(ConfigError, match=r"model: hdvt_tiny_32 does not take a graph.*use one of model=gcn"):
        build_model(cfg, build_datamodule(cfg))
    with pytest.raises(ConfigError, match=r"model: gcn takes a graph, but data=digits gives none; use data=cora"):
        cfg = compose_cfg(["model=gcn"])
        build_model(cfg, build_datamodule(cfg))


def test_imagenet100_vit_trains(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "data" / "imagenet100", ["n01558993", "n01692333"], {"train": 5, "val": 2})
    # no download option: ImageNet cannot be downloaded
    overrides = ["experiment=imagenet100_vit", f"paths.data_dir={tmp_path / 'data'}", *LOCAL[1:]]
    assert compose_cfg(overrides).model.name == "vit_tiny_patch16_224"
    run = tmp_path / "run"
    cfg = compose_cfg(
        [*overrides, *FAST, "data.batch_size=4", "data.val_size=2", "data.image_size=32", "scheduler.warmup_epochs=0",
         "model.kwargs={img_size: 32, patch_size: 8, depth: 2}"],  # a two-block ViT-Tiny
        output_dir=run,
    )  # fmt: skip
    saved = _train(cfg, run)
    assert (saved["data"], saved["model"]) == ("imagenet100", "vit_tiny_patch16_224")
