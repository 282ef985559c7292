"""nn.Embedding preconditioning: the update equals that of the nn.Linear (no bias) on
one-hot inputs, in float64, for SINGD's structures and KFAC; per-kind structures,
checkpoints, refused and shared embeddings, and a Lightning step."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from singd_lightning import SINGD
from singd_lightning.optim.curvature import EmbeddingLayer, input_rows
from singd_lightning.optim.kfac import KFAC
from singd_lightning.optim.singd import DEFAULT_LAYER_STRUCTURES, IKFAC, INGD

V, D, C, B, S = 12, 5, 4, 3, 7
HIER = {"name": "hierarchical", "k1": 3, "k2": 2}


def _models(padding_idx: int | None = None) -> tuple[nn.Module, nn.Module]:
    """An embedding model and its oracle: the same with ``nn.Linear`` on one-hot inputs."""
    torch.manual_seed(0)
    emb = nn.Embedding(V, D, padding_idx=padding_idx)
    lin = nn.Linear(V, D, bias=False)
    with torch.no_grad():
        lin.weight.copy_(emb.weight.T)
    head = nn.Linear(D, C)
    return (
        nn.Sequential(emb, nn.Tanh(), head).double(),
        nn.Sequential(lin, nn.Tanh(), copy.deepcopy(head)).double(),
    )


def _batches(steps: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        x = torch.randint(0, V, (B, S), generator=g)
        x[0, :3] = 2  # repeated tokens: counts above 1
        out.append((x, torch.randint(0, C, (B, S), generator=g)))
    return out


def _train(model: nn.Module, optimizer, one_hot: bool, batches) -> None:
    for x, y in batches:
        optimizer.zero_grad()
        inputs = F.one_hot(x, V).double() if one_hot else x
        F.cross_entropy(model(inputs).reshape(-1, C), y.reshape(-1)).backward()
        optimizer.step()


CASES = {
    "singd-dense": (SINGD, dict(structures="dense", layer_structures={"Embedding": "dense"}), dict(structures="dense")),
    "singd-diagonal": (SINGD, dict(structures="diagonal"), dict(structures="diagonal")),
    "singd-hierarchical": (SINGD, dict(structures=HIER, layer_structures={"Embedding": None}), dict(structures=HIER)),
    "singd-block_diagonal": (
        SINGD,
        dict(structures={"name": "block_diagonal", "block_size": 4}, layer_structures={"Embedding": None}),
        dict(structures={"name": "block_diagonal", "block_size": 4}),
    ),
    # the default: a diagonal K for the embedding only (the oracle's first layer in its own group)
    "singd-default-embedding-K": (SINGD, dict(structures=HIER), dict(structures=HIER, first=("diagonal", HIER))),
    "ikfac": (IKFAC, dict(layer_structures={"Embedding": "dense"}), {}),
    "kfac": (KFAC, {}, {}),
}


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_update_equals_linear_on_one_hot_inputs(case: str, approx: str) -> None:
    cls, emb_options, lin_options = CASES[case]
    if cls is KFAC and approx == "reduce":
        # A sample's mean one-hot vector is no one-hot vector: the reduced statistic
        # is not diagonal, and KFAC keeps only its diagonal (tested below).
        pytest.skip("KFAC's diagonal A differs from the dense one under 'reduce'")
    emb_model, lin_model = _models()
    start = emb_model[0].weight.detach().clone()
    common = dict(lr=0.1, T=1, loss_average="batch+sequence", kfac_approx=approx)
    emb_opt = cls(emb_model, **common, **emb_options)
    lin_options = dict(lin_options)
    first = lin_options.pop("first", None)
    if first is not None:
        groups = [{"params": [lin_model[0].weight], "structures": first}, {"params": list(lin_model[2].parameters())}]
        lin_options["params"] = groups
    lin_opt = cls(lin_model, **common, **lin_options)
    assert isinstance(emb_opt.layers[0], EmbeddingLayer) and emb_opt.layers[0].name == "0"
    batches = _batches()
    _train(emb_model, emb_opt, False, batches)
    _train(lin_model, lin_opt, True, batches)
    torch.testing.assert_close(emb_model[0].weight, lin_model[0].weight.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(emb_model[2].weight, lin_model[2].weight, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(emb_model[0].weight, start)  # it did train


def test_input_statistics_come_from_counts_without_one_hot() -> None:
    emb = nn.Embedding(V, D)
    layer = EmbeddingLayer("e", emb, {}, False)
    x = torch.tensor([[1, 1, 3], [0, 1, 11]])
    rows = input_rows(layer, x, "expand", torch.float64)
    counts = torch.bincount(x.flatten(), minlength=V).double()
    one_hot = F.one_hot(x.flatten(), V).double().T
    assert rows.n == 6 and rows.dim == V
    torch.testing.assert_close(rows.square_sums(), counts)
    torch.testing.assert_close(rows.gram(), one_hot @ one_hot.T)
    index = torch.tensor([1, 5, 11])
    torch.testing.assert_close(rows.cross(index), (one_hot @ one_hot.T)[index])
    # the chunked build (structures without a direct product) has the same Gram matrix
    torch.testing.assert_close(rows.reduce(lambda m: m @ m.T, max_bytes=8 * V * 5), one_hot @ one_hot.T)


def test_float16_rows_hold_counts_beyond_its_range() -> None:
    layer = EmbeddingLayer("e", nn.Embedding(V, D), {}, False)
    x = torch.full((70_000,), 3)  # a count float16 cannot hold
    rows = input_rows(layer, x, "expand", torch.float16)
    rows.scale = 1.0 / math.sqrt(rows.n)  # as the collector scales float16 rows
    gram = rows.reduce(lambda m: m.float() @ m.float().T)
    assert torch.isfinite(gram).all() and gram[3, 3].item() == pytest.approx(1.0, rel=1e-3)


def test_reduce_rows_are_the_samples_mean_one_hot_vectors() -> None:
    layer = EmbeddingLayer("e", nn.Embedding(V, D), {}, False)
    x = torch.tensor([[1, 1, 3], [0, 1, 11]])
    rows = input_rows(layer, x, "reduce", torch.float64)
    means = F.one_hot(x, V).double().mean(dim=1)  # (N, V)
    assert rows.n == 2
    torch.testing.assert_close(rows.gram(), means.T @ means)
    torch.testing.assert_close(rows.square_sums(), means.square().sum(dim=0))


def test_default_embedding_k_is_diagonal_and_per_kind_structures_apply() -> None:
    model = _models()[0]
    for optimizer in (SINGD(model, structures="dense"), INGD(model)):
        layouts = optimizer.state_dict()["kronecker"]["layouts"]
        assert layouts["0"]["module"] == "Embedding"
        assert layouts["0"]["K"]["structure"] == "diagonal" and layouts["0"]["C"]["structure"] == "dense"
        assert "module" not in layouts["2"] and layouts["2"]["K"]["structure"] == "dense"
        optimizer.remove_hooks()
    optimizer = SINGD(model, structures="diagonal", layer_structures={"Linear": (None, "dense"), "Embedding": "dense"})
    layouts = optimizer.state_dict()["kronecker"]["layouts"]
    assert (layouts["0"]["K"]["structure"], layouts["0"]["C"]["structure"]) == ("dense", "dense")
    assert (layouts["2"]["K"]["structure"], layouts["2"]["C"]["structure"]) == ("diagonal", "dense")
    assert optimizer.param_groups[0]["layer_structures"]["Embedding"] == ("dense", "dense")
    assert DEFAULT_LAYER_STRUCTURES == {"Embedding": ("diagonal", None)}
    kfac = KFAC(model)
    assert kfac.layer_state["0"]["A"].shape == (V,) and kfac.layer_state["2"]["A"].shape == (D + 1, D + 1)
    assert kfac.state_dict()["kronecker"]["layouts"]["0"]["A"] == {"dim": V, "structure": "diagonal"}


@pytest.mark.parametrize(
    "value, match",
    [
        ({"Conv3d": "dense"}, r"unknown layer kinds \['Conv3d'\]; valid kinds are \['Linear', 'Conv1d', 'Conv2d', 'Embedding'\]"),
        ({"Embedding": "nope"}, "Unknown structure 'nope'"),
        ({"Embedding": ("dense", "dense", "dense")}, "structures must be a pair"),
        ("diagonal", "layer_structures must be a mapping"),
    ],
)
def test_bad_layer_structures_are_refused(value, match: str) -> None:
    model = _models()[0]
    with pytest.raises(ValueError, match=match):
        SINGD(model, layer_structures=value)


@pytest.mark.parametrize("make", [lambda m: SINGD(m, T=1, lr=0.1), lambda m: KFAC(m, T=1, lr=0.1)], ids=["singd", "kfac"])
def test_checkpoint_round_trip_and_layout_check(make) -> None:
    batches = _batches(4)
    reference, resumed = _models()[0], _models()[0]
    ref_opt = make(reference)
    _train(reference, ref_opt, False, batches)
    first = make(resumed)
    _train(resumed, first, False, batches[:2])
    state = copy.deepcopy(first.state_dict())
    second = make(resumed)
    second.load_state_dict(state)
    _train(resumed, second, False, batches[2:])
    for p, q in zip(reference.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    if isinstance(first, SINGD):  # a dense embedding K is another layout
        other = SINGD(_models()[0], layer_structures={"Embedding": "dense"})
        with pytest.raises(ValueError, match="layer '0' was saved as"):
            other.load_state_dict(state)


def test_padding_row_is_not_updated() -> None:
    model = _models(padding_idx=2)[0]
    optimizer = SINGD(model, T=1, lr=0.1, layer_structures={"Embedding": "dense"})
    before = model[0].weight.detach().clone()
    _train(model, optimizer, False, _batches())
    after = model[0].weight.detach()
    torch.testing.assert_close(after[2], before[2], rtol=0, atol=0)
    assert not torch.allclose(after, before)


def test_sparse_embeddings_are_refused_and_frequency_scaled_ones_go_to_the_fallback() -> None:
    model = _models()[0]
    model[0].sparse = True
    for fallback in ("adamw", "sgd"):
        with pytest.raises(ValueError, match=r"nn\.Embedding 0 has sparse=True.*use sparse=False"):
            SINGD(model, fallback=fallback)
    model[0].weight.requires_grad_(False)  # a frozen one is no concern (nor named)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [layer.name for layer in SINGD(model).layers] == ["2"]
    model = _models()[0]
    model[0].scale_grad_by_freq = True
    with pytest.warns(UserWarning, match="scale_grad_by_freq"):
        optimizer = SINGD(model, T=1)
    assert [layer.name for layer in optimizer.layers] == ["2"]
    before = model[0].weight.detach().clone()
    _train(model, optimizer, False, _batches(1))
    assert not torch.equal(model[0].weight, before)


def test_tied_embedding_and_head_share_the_fallback() -> None:
    from singd_lightning.models import create_model

    torch.manual_seed(0)
    model = create_model("gpt", 32, seq_len=8, depth=1, embed_dim=16, num_heads=2, tie_embeddings=True)
    assert model.head.weight is model.tok_embed.weight
    with pytest.warns(UserWarning, match=r"tok_embed \(its weight is shared with head\); head \(its weight"):
        optimizer = SINGD(model, T=1, lr=0.05, loss_average="batch+sequence")
    names = {layer.name for layer in optimizer.layers}
    assert "tok_embed" not in names and "head" not in names and "blocks.0.attn.qkv" in names
    roles = {id(p): g["role"] for g in optimizer.param_groups for p in g["params"]}
    assert roles[id(model.tok_embed.weight)] == "fallback"
    x = torch.randint(0, 32, (2, 8))
    before = model.tok_embed.weight.detach().clone()
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(x).reshape(-1, 32), x.roll(-1, 1).reshape(-1)).backward()
        optimizer.step()
    assert torch.isfinite(model.tok_embed.weight).all() and not torch.equal(model.tok_embed.weight, before)


def test_lightning_module_trains_the_embedding_one_step() -> None:
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from singd_lightning.app.module import ImageClassifier
    from singd_lightning.models import create_model

    torch.manual_seed(0)
    net = create_model("gpt", 32, seq_len=8, depth=1, embed_dim=16, num_heads=2)
    x = torch.randint(0, 32, (4, 9))
    loader = DataLoader(TensorDataset(x[:, :-1], x[:, 1:]), batch_size=4)
    module = ImageClassifier(net, {"name": "singd", "T": 1, "loss_average": "batch+sequence", "lr": 0.05})
    before = net.tok_embed.weight.detach().clone()
    trainer = L.Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)
    optimizer = trainer.optimizers[0]
    layer = next(layer for layer in optimizer.layers if layer.name == "net.tok_embed")
    assert isinstance(layer, EmbeddingLayer)
    assert optimizer.steps == 1 and not torch.equal(optimizer.layer_state["net.tok_embed"]["C"], torch.eye(16).flatten())
    assert not torch.equal(net.tok_embed.weight, before)


@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_model_gets_the_eager_update() -> None:
    from singd_lightning.models import create_model

    torch.manual_seed(0)
    eager = create_model("gpt", 32, seq_len=8, depth=1, embed_dim=16, num_heads=2)
    compiled = copy.deepcopy(eager)
    compiled.compile(backend="aot_eager")
    x = torch.randint(0, 32, (2, 8))
    optimizers = []
    for model in (eager, compiled):
        optimizer = SINGD(model, T=1, lr=0.05, loss_average="batch+sequence")
        for _ in range(2):
            optimizer.zero_grad()
            F.cross_entropy(model(x).reshape(-1, 32), x.roll(-1, 1).reshape(-1)).backward()
            optimizer.step()
        optimizers.append(optimizer)
    assert not torch.equal(optimizers[1].layer_state["tok_embed"]["C"], torch.eye(16).flatten())
    torch.testing.assert_close(optimizers[0].layer_state["tok_embed"]["K"], optimizers[1].layer_state["tok_embed"]["K"])
    for p, q in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(p, q)
