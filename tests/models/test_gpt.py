"""The GPT decoder: shapes, causality, tied embeddings, argument checks, and that
SINGD preconditions its Linear layers and token embedding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from singd_lightning.models import MODELS, TOKEN_MODELS, GPT, create_model

SMALL = dict(depth=2, embed_dim=16, num_heads=2)


def test_registered_with_the_data_sizes() -> None:
    assert TOKEN_MODELS == {"gpt"} and MODELS["gpt"] is not None
    model = create_model("gpt", num_classes=256, in_chans=1, seq_len=32)
    assert isinstance(model, GPT) and (model.vocab_size, model.block_size, model.num_classes) == (256, 32, 256)
    assert sum(p.numel() for p in model.parameters()) == 875_520 - (128 - 32) * 128  # default 4 x 128
    assert model.no_weight_decay() == {"pos_embed"}


def test_logits_shape_and_causality() -> None:
    torch.manual_seed(0)
    model = create_model("gpt", 40, seq_len=12, **SMALL).eval()
    x = torch.randint(0, 40, (3, 10))
    logits = model(x)
    assert logits.shape == (3, 10, 40)
    changed = x.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 40  # the future must not change the past
    torch.testing.assert_close(model(changed)[:, :6], logits[:, :6])
    assert not torch.allclose(model(changed)[:, 6:], logits[:, 6:])


def test_tied_embeddings_share_one_parameter() -> None:
    untied = create_model("gpt", 40, seq_len=12, **SMALL)
    tied = create_model("gpt", 40, seq_len=12, tie_embeddings=True, **SMALL)
    assert tied.head.weight is tied.tok_embed.weight and tied.head.bias is None
    assert untied.head.weight is not untied.tok_embed.weight and untied.head.bias is not None
    n = sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters())
    assert n == 40 * 16 + 40  # one weight and the head's bias fewer


def test_all_projections_are_linear_and_preconditioned() -> None:
    from singd_lightning import SINGD

    model = create_model("gpt", 40, seq_len=12, **SMALL)
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert "blocks.0.attn.qkv" in linears and "blocks.0.attn.proj" in linears and "head" in linears
    optimizer = SINGD(model, structures="diagonal")
    assert {layer.name for layer in optimizer.layers} == {*linears, "tok_embed"}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"embed_dim": 10, "num_heads": 3}, "num_heads must divide embed_dim"),
        ({"depth": 0}, "depth must be an integer >= 1, got 0"),
        ({"drop_rate": 1.0}, r"drop_rate must be in \[0, 1\)"),
        ({"mlp_ratio": 0}, "mlp_ratio must be a number > 0"),
        ({"tie_embeddings": "yes"}, "tie_embeddings must be true or false"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GPT(**kwargs)


def test_bad_inputs_are_refused() -> None:
    model = create_model("gpt", 40, seq_len=8, **SMALL)
    with pytest.raises(ValueError, match=r"S <= block_size=8, got \(2, 9\)"):
        model(torch.zeros(2, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids of shape"):
        model(torch.zeros(2, 8))
