"""Shape, gradient, size and design checks for every registered model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from singd_lightning.models import MODELS, SEQUENCE_MODELS, TOKEN_MODELS, create_model
from singd_lightning.models.cct import cct_tiny, sinusoidal_embedding
from singd_lightning.models.swin import (
    SwinBlock,
    shifted_window_mask,
    swin_nano,
    window_partition,
    window_reverse,
)

# name -> (input size, num_classes, parameter interval in millions)
SPECS: dict[str, tuple[int, int, tuple[float, float]]] = {
    "vgg11": (32, 100, (9.2, 9.4)),
    "vgg13": (32, 100, (9.4, 9.6)),
    "vgg16": (32, 100, (14.6, 15.0)),
    "vgg19": (32, 100, (19.9, 20.3)),
    "vgg_small": (32, 10, (0.015, 0.04)),
    "convmixer_256_8": (32, 100, (0.58, 0.65)),
    "convmixer_256_16": (128, 100, (1.4, 1.55)),
    "convmixer_tiny": (32, 10, (0.002, 0.01)),
    "cct_7_3x1_32": (32, 100, (3.7, 3.85)),  # CCT paper: 3.76M for 10 classes
    "cct_7_7x2_128": (128, 10, (4.4, 4.6)),
    "cct_7_7x2_160": (160, 10, (4.4, 4.6)),
    "cct_tiny": (32, 10, (0.01, 0.04)),
    "swin_tiny_32": (32, 100, (6.9, 7.3)),
    "swin_tiny_128": (128, 10, (6.9, 7.3)),
    "swin_tiny_160": (160, 10, (6.9, 7.3)),
    "swin_nano": (32, 10, (0.01, 0.04)),
}
TINY = ["vgg_small", "convmixer_tiny", "cct_tiny", "swin_nano"]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


#: Models tested in tests/models/test_paper_models.py (sizes, shapes, one SINGD step).
PAPER_MODELS = {
    "gcn", "gcvit_nano", "gcvit_xxtiny_32", "gcvit_xxtiny_128", "repvit_nano", "repvit_m0_9",
    "hdvt_nano", "hdvt_tiny_32", "hdvt_small_32", "hdvt_tiny_128",
}  # fmt: skip


def test_specs_cover_registry() -> None:
    # the 1-D sequence models: tests/models/test_mlp_cnn1d.py; the GPT: tests/models/test_gpt.py
    assert set(SPECS) == set(MODELS) - SEQUENCE_MODELS - TOKEN_MODELS - PAPER_MODELS
    assert PAPER_MODELS <= set(MODELS)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_parameter_count(name: str) -> None:
    _, classes, (lo, hi) = SPECS[name]
    with torch.device("meta"):  # no allocation or initialisation: instant
        model = create_model(name, num_classes=classes)
    count = n_params(model)
    assert lo * 1e6 <= count <= hi * 1e6, f"{name}: {count} parameters"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_forward_backward(name: str) -> None:
    size, classes, _ = SPECS[name]
    torch.manual_seed(0)
    model = create_model(name, num_classes=classes)
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, classes)
    assert torch.isfinite(out).all()
    out.logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{name}: no gradient for {missing}"


@pytest.mark.parametrize("name", TINY)
def test_tiny_models_other_inputs(name: str) -> None:
    model = create_model(name, num_classes=7, in_chans=1).eval()
    for h, w in [(32, 32), (48, 40)]:
        assert model(torch.randn(2, 1, h, w)).shape == (2, 7)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_only_linear_and_conv_hold_weight_matrices(name: str) -> None:
    """Every ≥2-D trainable weight sits in nn.Linear/nn.Conv2d, except embeddings."""
    with torch.device("meta"):
        model = create_model(name, num_classes=10)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    allowed = {"pos_embed", "relative_position_bias_table"}
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        for p_name, p in module.named_parameters(recurse=False):
            if p.ndim >= 2 and p.requires_grad:
                assert p_name in allowed, f"{name}: {module_name}.{p_name} {tuple(p.shape)}"


def test_create_model_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="Valid names:.*cct_7_3x1_32.*swin_tiny_32.*vgg16"):
        create_model("resnet50", num_classes=10)


def test_create_model_forwards_kwargs() -> None:
    model = create_model("cct_tiny", num_classes=5, in_chans=1, depth=3, img_size=64)
    assert len(model.blocks) == 3
    assert model.pos_embed.shape[1] == 16 * 16
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 5)


def test_vgg_larger_input_uses_adaptive_pool() -> None:
    model = create_model("vgg_small", num_classes=10).eval()
    assert model(torch.randn(2, 3, 160, 160)).shape == (2, 10)


def test_cct_positional_embeddings() -> None:
    learnable = cct_tiny()
    assert learnable.pos_embed.requires_grad
    sine = cct_tiny(positional_embedding="sine")
    assert not sine.pos_embed.requires_grad
    torch.testing.assert_close(sine.pos_embed, sinusoidal_embedding(64, 32))
    assert cct_tiny(positional_embedding="none").pos_embed is None
    with pytest.raises(ValueError, match="positional_embedding"):
        cct_tiny(positional_embedding="rope")


def test_drop_path_is_identity_in_eval_and_random_in_train() -> None:
    torch.manual_seed(0)
    model = cct_tiny(drop_path_rate=0.5, attn_drop_rate=0.0).eval()
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.allclose(model(x), model(x))


def test_window_partition_roundtrip() -> None:
    x = torch.randn(2, 8, 12, 5)
    windows = window_partition(x, 4)
    assert windows.shape == (2 * 2 * 3, 16, 5)
    torch.testing.assert_close(window_reverse(windows, 4, 8, 12), x)


def test_shifted_window_mask_structure() -> None:
    mask = shifted_window_mask(8, 8, window_size=4, shift=2)
    assert mask.shape == (4, 16, 16)
    torch.testing.assert_close(mask, mask.transpose(1, 2))
    assert (mask.diagonal(dim1=1, dim2=2) == 0).all()
    assert (mask[0] == 0).all()  # the top-left window holds a single region
    # the bottom-right window holds four 2x2 regions: 4 tokens see 4 tokens each
    assert ((mask[3] == 0).sum(-1) == 4).all()


@torch.no_grad()
@pytest.mark.parametrize("shift", [False, True])
def test_swin_block_receptive_field(shift: bool) -> None:
    """Perturbing token (0, 0) only changes tokens in its (shifted) window."""
    torch.manual_seed(0)
    block = SwinBlock(dim=8, num_heads=2, window_size=4, shift=shift).eval()
    x = torch.randn(1, 8, 8, 8)
    y = x.clone()
    y[0, 0, 0] += torch.randn(8)  # not a constant shift, which LayerNorm removes
    changed = (block(x) - block(y)).abs().amax(-1)[0] > 1e-6
    expected = torch.zeros(8, 8, dtype=torch.bool)
    if shift:
        # rolled by -2, token (0, 0) lands in the bottom-right window's 2x2 region
        # that only holds the originals (0..1, 0..1)
        expected[:2, :2] = True
    else:
        expected[:4, :4] = True
    assert torch.equal(changed, expected)


def test_swin_pads_grids_not_divisible_by_window() -> None:
    model = swin_nano().eval()
    assert model(torch.randn(1, 3, 36, 52)).shape == (1, 10)
