"""The paper's remaining models: GC-ViT and RepViT (timm), HDVT, the GCN, and a ViT.

Each builds with the data's classes and channels, gives logits of the right shape,
and takes a SINGD step on a CPU in which every ``nn.Linear``/``nn.Conv2d`` is
preconditioned and everything else goes to the fallback.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from singd_lightning.models import GRAPH_MODELS, MODELS, create_model, create_timm_model
from singd_lightning.models.gcn import GCN, propagate
from singd_lightning.models.hdvt import HDVT, HeadInteractionAttention
from singd_lightning.optim import SINGD

pytest.importorskip("timm")

TINY_IMAGE_MODELS = ["gcvit_nano", "repvit_nano", "hdvt_nano"]


@pytest.fixture(autouse=True)
def one_thread():
    """One CPU thread: these small models gain nothing from more, and on a busy
    machine idle threads spinning in parallel regions make each step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _vit_tiny(num_classes: int, in_chans: int) -> nn.Module:
    # the model=vit network (vit_tiny_patch16_224) at 32 px
    return create_timm_model("vit_tiny_patch16_224", num_classes, in_chans, kwargs={"img_size": 32, "patch_size": 8})


def _singd_step(model: nn.Module, inputs, targets: torch.Tensor) -> SINGD:
    """One SINGD step (factors updated: T=1); checks it moved every trained parameter."""
    optimizer = SINGD(model, lr=1e-2, structures=("diagonal", "diagonal"), T=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    F.cross_entropy(model(inputs), targets).backward()
    optimizer.step()
    kronecker = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert {layer.name for layer in optimizer.layers} == kronecker
    # (a bias right before a BatchNorm gets a gradient of rounding errors only)
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().max() > 1e-6}
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert grads and grads <= moved  # Kronecker layers and fallback parameters alike
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return optimizer


@pytest.mark.parametrize("name", TINY_IMAGE_MODELS + ["vit"])
def test_image_model_shapes_and_one_singd_step(name: str) -> None:
    torch.manual_seed(0)
    model = _vit_tiny(5, 3) if name == "vit" else create_model(name, num_classes=5, in_chans=3)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 4])
    assert model(x).shape == (4, 5)
    _singd_step(model, x, y)


def test_one_channel_input_and_fallback_of_the_non_kronecker_modules() -> None:
    model = create_model("gcvit_nano", num_classes=3, in_chans=1)
    optimizer = _singd_step(model, torch.randn(2, 1, 32, 32), torch.tensor([0, 2]))
    # GC-ViT's relative position tables and norms are trained by the fallback
    layer_params = {id(p) for layer in optimizer.layers for p in (layer.module.weight, layer.module.bias)
                    if p is not None}  # fmt: skip
    rest = [n for n, p in model.named_parameters() if id(p) not in layer_params]
    assert any("relative_position_bias" in n or "rel_pos" in n for n in rest)
    assert any("norm" in n for n in rest)


@pytest.mark.parametrize(
    ("name", "size", "classes", "low", "high"),
    [
        ("hdvt_tiny_32", 32, 100, 5.9e6, 6.1e6),
        ("hdvt_tiny_128", 128, 10, 5.9e6, 6.1e6),
        ("hdvt_small_32", 32, 100, 23.3e6, 23.6e6),
        ("repvit_m0_9", 32, 10, 4.6e6, 4.8e6),
        ("gcvit_xxtiny_32", 32, 100, 11.3e6, 11.6e6),
    ],
)
def test_paper_sizes(name: str, size: int, classes: int, low: float, high: float) -> None:
    model = create_model(name, num_classes=classes)
    assert low < sum(p.numel() for p in model.parameters()) < high
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, classes)


def test_gcvit_windows_at_32_px_are_not_single_pixels() -> None:
    model = create_model("gcvit_xxtiny_32", num_classes=10)
    windows = [tuple(stage.blocks[0].window_size) for stage in model.stages]
    assert windows == [(4, 4), (4, 4), (2, 2), (1, 1)]  # timm's default would be (1, 1) from stage 1


def test_repvit_has_no_distillation_head() -> None:
    model = create_model("repvit_nano", num_classes=4)
    assert not any("head_dist" in n for n, _ in model.named_parameters())


# ------------------------------------------------------------------ HDVT


def test_hdvt_keeps_the_token_count_and_takes_non_square_images() -> None:
    model = create_model("hdvt_nano", num_classes=3).eval()
    tokens = {}
    model.blocks[0].register_forward_hook(lambda m, args, out: tokens.setdefault("out", out))
    assert model(torch.randn(2, 3, 32, 48)).shape == (2, 3)
    assert tokens["out"].shape == (2, 1 + 8 * 12, 32)  # class token + patch tokens; head tokens dropped


def test_hdvt_head_tokens_reach_the_class_token() -> None:
    torch.manual_seed(0)
    attention = HeadInteractionAttention(dim=8, num_heads=2).eval()
    x = torch.randn(1, 5, 8)
    before = attention(x)
    with torch.no_grad():
        attention.head_token_embed.add_(1.0)  # changes only the head tokens
    after = attention(x)
    assert not torch.allclose(before[:, 0], after[:, 0])


def test_hdvt_class_token_is_reweighted_by_the_feed_forward() -> None:
    torch.manual_seed(0)
    ffn = create_model("hdvt_nano", num_classes=3).blocks[0].ffn.eval()
    x = torch.randn(1, 1 + 16, 32)
    with torch.no_grad():
        ffn.excite.weight.zero_()
        ffn.excite.bias.fill_(2.0)  # the squeeze-excitation's channel weights are all 2
    out = ffn(x, (4, 4))
    torch.testing.assert_close(out[0, 0], 2.0 * x[0, 0])  # not passed through the convolutions
    assert out.shape == x.shape


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"patch_size": 3}, "patch_size must be one of 2, 4, 8, 16"),
        ({"embed_dim": 30, "num_heads": 4}, r"embed_dim \(30\) must be divisible by num_heads"),
        ({"img_size": 30}, r"img_size \(30\) must be a multiple of patch_size"),
        ({"depth": 0}, "depth must be an integer >= 1"),
    ],
)
def test_hdvt_bad_sizes(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HDVT(**{"embed_dim": 32, "depth": 1, "num_heads": 2, **kwargs})


def test_hdvt_refuses_images_that_do_not_tile() -> None:
    with pytest.raises(ValueError, match=r"multiples of the patch size 4"):
        create_model("hdvt_nano", num_classes=3)(torch.randn(1, 3, 30, 32))


# ------------------------------------------------------------------ GCN


def _graph(n: int = 6, features: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    dense = torch.zeros(n, n)
    for a in range(n):
        dense[a, (a + 1) % n] = dense[(a + 1) % n, a] = 1.0
    dense += torch.eye(n)
    scale = dense.sum(1).rsqrt()
    return torch.randn(n, features), (scale[:, None] * dense * scale[None]).to_sparse()


def test_gcn_is_registered_as_a_graph_model() -> None:
    assert GRAPH_MODELS == {"gcn"} and MODELS["gcn"] is not None


def test_gcn_layer_is_the_papers_propagation_with_the_bias_after_it() -> None:
    torch.manual_seed(0)
    x, adjacency = _graph()
    model = GCN(num_classes=3, in_chans=4, hidden_dims=(5,), dropout=0.5).eval()
    dense = adjacency.to_dense()
    first, second = model.layers
    hidden = torch.relu(dense @ (x @ first.weight.T) + first.bias)  # Â (X W) + b
    expected = dense @ (hidden @ second.weight.T) + second.bias
    torch.testing.assert_close(model((x, adjacency)), expected)
    torch.testing.assert_close(propagate(adjacency, x), dense @ x)
    assert propagate(adjacency, x.bfloat16()).dtype == torch.bfloat16


def test_gcn_singd_step_preconditions_both_layers() -> None:
    torch.manual_seed(0)
    x, adjacency = _graph()
    model = create_model("gcn", num_classes=3, in_chans=4)
    targets = torch.tensor([0, 1, -100, -100, 2, -100])  # unlabelled nodes are ignored
    optimizer = _singd_step(model, (x, adjacency), targets)
    assert [layer.name for layer in optimizer.layers] == ["layers.0", "layers.1"]


@pytest.mark.parametrize(
    ("factory", "error", "message"),
    [
        (lambda: GCN(3, 4, hidden_dims=(0,)), ValueError, "must be integers >= 1"),
        (lambda: GCN(3, 4, dropout=1.0), ValueError, r"dropout must be a number in \[0, 1\)"),
        (lambda: GCN(3, 4)(torch.randn(2, 4)), TypeError, r"takes the tuple \(features, adjacency\)"),
    ],
)
def test_gcn_bad_arguments(factory: Callable[[], object], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        factory()
