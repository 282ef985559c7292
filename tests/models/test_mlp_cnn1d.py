"""The 1-D sequence models (mlp, cnn1d): shapes, sizes, argument checks, and the app
with data=mnist1d (one fast SINGD epoch each; an image model on sequences is refused)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from singd_lightning.app.errors import ConfigError, user_error_message
from singd_lightning.app.pipeline import train
from singd_lightning.models import MODELS, SEQUENCE_MODELS, CNN1d, MLP, create_model
from tests.app.helpers import FAST, compose_cfg


def test_registered() -> None:
    assert SEQUENCE_MODELS == {"mlp", "cnn1d"} and SEQUENCE_MODELS <= set(MODELS)


@pytest.mark.parametrize("name", sorted(SEQUENCE_MODELS))
@pytest.mark.parametrize(("in_chans", "seq_len", "classes"), [(1, 40, 10), (3, 24, 7)])
def test_forward_backward_shapes(name: str, in_chans: int, seq_len: int, classes: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=classes, in_chans=in_chans, seq_len=seq_len)
    out = model(torch.randn(5, in_chans, seq_len))
    assert out.shape == (5, classes) and torch.isfinite(out).all()
    out.logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_mlp_default_architecture() -> None:
    model = create_model("mlp", num_classes=10, in_chans=1, seq_len=40)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(40, 256), (256, 256), (256, 10)]
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 2
    assert sum(p.numel() for p in model.parameters()) == 78858
    linear = MLP(num_classes=4, in_chans=2, seq_len=8, hidden_dims=())
    assert [m.in_features for m in linear.modules() if isinstance(m, nn.Linear)] == [16]


def test_cnn1d_default_architecture() -> None:
    model = create_model("cnn1d", num_classes=10, in_chans=1, seq_len=40)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv1d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size[0]) for m in convs] == [(1, 32, 5), (32, 64, 5), (64, 64, 5)]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.modules()) == 3
    plain = CNN1d(batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in plain.modules())
    assert all(m.bias is not None for m in plain.modules() if isinstance(m, nn.Conv1d))
    # global pooling: any length
    assert model.eval()(torch.randn(2, 1, 7)).shape == (2, 10)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: MLP(seq_len=0), "seq_len must be an integer >= 1"),
        (lambda: MLP(hidden_dims=(256, -1)), "hidden_dims entries must be an integer >= 1"),
        (lambda: MLP(drop_rate=1.0), "drop_rate must be in"),
        (lambda: CNN1d(channels=()), "channels must contain at least one"),
        (lambda: CNN1d(kernel_size=4), "kernel_size must be an odd integer"),
        (lambda: CNN1d(in_chans=0), "in_chans must be an integer >= 1"),
    ],
)
def test_invalid_arguments(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_wrong_input_shape_is_named() -> None:
    with pytest.raises(ValueError, match="MLP expects inputs of 40 features"):
        MLP()(torch.randn(2, 1, 32))
    with pytest.raises(ValueError, match=r"CNN1d expects sequences \(N, in_chans, length\)"):
        CNN1d()(torch.randn(2, 1, 8, 8))


@pytest.mark.parametrize("model", ["mlp", "cnn1d"])
def test_one_fast_singd_epoch_on_mnist1d(model: str, tmp_path: Path) -> None:
    cfg = compose_cfg(["data=mnist1d", f"model={model}", "optimizer=singd", *FAST], output_dir=tmp_path)
    results = train(cfg)
    assert results["status"] == "ok", results.get("error")
    assert (results["data"], results["model"], results["optimizer"]) == ("mnist1d", model, "singd")
    assert results["global_step"] == 2 and 0 <= results["test_acc"] <= 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data=mnist1d", "model=vgg_small"],
         "model: vgg_small takes 2-D images, but data=mnist1d gives 1-D sequences of length 40; "
         "use one of model=cnn1d, model=mlp."),
        (["model=mlp"], "model: mlp takes 1-D sequences, but data=digits gives 2-D images; use data=mnist1d."),
    ],
)  # fmt: skip
def test_image_model_on_sequences_is_a_one_line_error(overrides: list[str], message: str, tmp_path: Path) -> None:
    cfg = compose_cfg([*overrides, *FAST], output_dir=tmp_path)
    with pytest.raises(ConfigError) as info:
        train(cfg)
    assert user_error_message(info.value) == message


def test_singd_preconditions_every_layer_of_cnn1d() -> None:
    from singd_lightning.optim import SINGD

    model = create_model("cnn1d", num_classes=10, in_chans=1, seq_len=40)
    optimizer = SINGD(model)
    assert [type(layer.module) for layer in optimizer.layers] == [nn.Conv1d, nn.Conv1d, nn.Conv1d, nn.Linear]
