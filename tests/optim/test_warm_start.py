"""SINGD's factor starts (``factor_init``), the KL clip (``kl_clip``) and the
factor learning-rate warm-up (``optim.schedules``), against float64 hand
computations."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

from singd_lightning.lightning.factory import build_optimizer
from singd_lightning.optim import singd as singd_module
from singd_lightning.optim.schedules import LrCovWarmup, apply_lr_cov_schedule, lr_cov_warmup
from singd_lightning.optim.singd import IKFAC, INGD, INITIALIZED, KL_CLIP, PAPER_UPDATE, SINGD

SPARSE = [
    "diagonal",
    {"name": "block_diagonal", "block_size": 2},
    "tril",
    "triu",
    "tril_toeplitz",
    "triu_toeplitz",
    {"name": "hierarchical", "k1": 2, "k2": 1},
    "tril_bottom_right_diagonal",
    "tril_top_left_diagonal",
    "triu_top_left_diagonal",
    "triu_bottom_right_diagonal",
]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(32, 6, generator=generator, dtype=torch.float64), torch.randint(0, 3, (32,), generator=generator)


def _step(model: nn.Module, optimizer, seed: int = 1) -> None:
    x, y = _batch(seed)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def _first_statistics(monkeypatch, optimizer_cls, model, **options):
    """The optimizer after one step, and the statistics its start was given."""
    seen = {}
    original = singd_module.SINGD._initial_factors

    def spy(self, layer, h_k, h_c):
        seen[layer.name] = (h_k.clone(), h_c.clone())
        return original(self, layer, h_k, h_c)

    monkeypatch.setattr(singd_module.SINGD, "_initial_factors", spy)
    optimizer = optimizer_cls(model, lr=0.0, **options)
    _step(model, optimizer)
    return optimizer, seen


def _dense(layout, data):
    return layout.to_dense(data).double()


def _sym(layout, h):
    dense = _dense(layout, h)
    return (dense + dense.T) / 2


# ------------------------------------------------------------------ identity
def test_defaults_are_the_identity_start_and_the_kl_clip():
    for cls in (SINGD, INGD, IKFAC):
        group = cls(_model()).param_groups[0]
        assert (group["factor_init"], group["kl_clip"]) == ("identity", KL_CLIP), cls
    assert KL_CLIP == 1e-3


def test_paper_update_is_the_identity_start_without_clip_bit_for_bit():
    """``PAPER_UPDATE`` gives the paper's start: no start marker, and the factors
    after one step are ``I − β₁ m`` of the first statistics (the reference tests
    compare whole runs)."""
    model_a, model_b = _model(), _model()
    paper = SINGD(model_a, lr=0.1, T=1, structures=("tril", "diagonal"), **PAPER_UPDATE)
    explicit = SINGD(model_b, lr=0.1, T=1, structures=("tril", "diagonal"), factor_init="identity", kl_clip=None)
    for seed in range(4):
        _step(model_a, paper, seed)
        _step(model_b, explicit, seed)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
    for name, state in paper.layer_state.items():
        assert INITIALIZED not in state


# ------------------------------------------------------------ scaled identity
def test_scaled_identity_ikfac_matches_the_trace_of_the_damped_statistics(monkeypatch):
    optimizer, seen = _first_statistics(monkeypatch, IKFAC, _model(), factor_init="scaled_identity", damping=1e-2)
    for layer in optimizer.layers:
        layout_k, layout_c = optimizer.layouts(layer)
        h_k, h_c = seen[layer.name]
        a = torch.trace(_dense(layout_k, h_k)) / layout_k.dim
        g = torch.trace(_dense(layout_c, h_c)) / layout_c.dim
        state = optimizer.layer_state[layer.name]
        torch.testing.assert_close(_dense(layout_k, state["K"]), torch.eye(layout_k.dim, dtype=torch.float64) / (a + 1e-2).sqrt())
        torch.testing.assert_close(_dense(layout_c, state["C"]), torch.eye(layout_c.dim, dtype=torch.float64) / (g + 1e-2).sqrt())


@pytest.mark.parametrize("structure", ["dense", "tril_toeplitz", "hierarchical"])
def test_scaled_identity_singd_is_the_scale_of_the_fixed_point(monkeypatch, structure):
    damping = 1e-2
    optimizer, seen = _first_statistics(
        monkeypatch, SINGD, _model(), factor_init="scaled_identity", damping=damping, structures=structure
    )
    for layer in optimizer.layers:
        layout_k, layout_c = optimizer.layouts(layer)
        h_k, h_c = seen[layer.name]
        a = torch.trace(_dense(layout_k, h_k)) / layout_k.dim
        g = torch.trace(_dense(layout_c, h_c)) / layout_c.dim
        K = _dense(layout_k, optimizer.layer_state[layer.name]["K"])
        C = _dense(layout_c, optimizer.layer_state[layer.name]["C"])
        c_k, c_c = K[0, 0], C[0, 0]
        # Multiples of I, whose product solves τ(c_K² (τ(c_C² S_g) Sₐ + λ c_C² I)) = 1.
        torch.testing.assert_close(K, c_k * torch.eye(layout_k.dim, dtype=torch.float64))
        torch.testing.assert_close(C, c_c * torch.eye(layout_c.dim, dtype=torch.float64))
        torch.testing.assert_close(c_k**2 * c_c**2 * (a * g + damping), torch.tensor(1.0, dtype=torch.float64))
        # Each factor takes its own statistic's scale: c_K² (a + √λ) = c_C² (g + √λ).
        torch.testing.assert_close(c_k**2 * (a + damping**0.5), c_c**2 * (g + damping**0.5))


# ----------------------------------------------------------------------- warm
def test_warm_ikfac_dense_reaches_the_damped_inverses(monkeypatch):
    damping = 1e-2
    optimizer, seen = _first_statistics(monkeypatch, IKFAC, _model(), factor_init="warm", damping=damping)
    for layer in optimizer.layers:
        layout_k, layout_c = optimizer.layouts(layer)
        h_k, h_c = seen[layer.name]
        state = optimizer.layer_state[layer.name]
        for layout, h, key in ((layout_k, h_k, "K"), (layout_c, h_c, "C")):
            factor = _dense(layout, state[key])
            expected = torch.linalg.inv(_sym(layout, h) + damping * torch.eye(layout.dim, dtype=torch.float64))
            torch.testing.assert_close(factor @ factor.T, expected, rtol=1e-8, atol=1e-8)


def test_warm_ingd_dense_is_the_trace_scaled_fixed_point(monkeypatch):
    damping = 1e-2
    optimizer, seen = _first_statistics(monkeypatch, INGD, _model(), factor_init="warm", damping=damping)
    for layer in optimizer.layers:
        layout_k, layout_c = optimizer.layouts(layer)
        s_a, s_g = (_sym(layout, h) for layout, h in zip((layout_k, layout_c), seen[layer.name]))
        K = _dense(layout_k, optimizer.layer_state[layer.name]["K"])
        C = _dense(layout_c, optimizer.layer_state[layer.name]["C"])
        d_k, d_c = layout_k.dim, layout_c.dim
        eye_k, eye_c = torch.eye(d_k, dtype=torch.float64), torch.eye(d_c, dtype=torch.float64)
        # K Kᵀ = (τ(Cᵀ S_g C) Sₐ + λ τ(CᵀC) I)⁻¹ and the same for C Cᵀ.
        m_k = torch.trace(C.T @ s_g @ C) / d_c * s_a + damping * torch.trace(C.T @ C) / d_c * eye_k
        m_c = torch.trace(K.T @ s_a @ K) / d_k * s_g + damping * torch.trace(K.T @ K) / d_k * eye_c
        torch.testing.assert_close(K @ K.T, torch.linalg.inv(m_k), rtol=1e-7, atol=1e-8)
        torch.testing.assert_close(C @ C.T, torch.linalg.inv(m_c), rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize(
    "structure, kfac_like",
    [(s, False) for s in SPARSE] + [("tril", True), ("tril_toeplitz", True), ("triu_top_left_diagonal", True)],
    ids=lambda v: v if isinstance(v, str) else (v["name"] if isinstance(v, dict) else ("ikfac" if v else "singd")),
)
def test_warm_sparse_keeps_the_structure_and_settles(monkeypatch, structure, kfac_like):
    options = dict(factor_init="warm", structures=structure, kfac_like=kfac_like, damping=1e-2)
    if kfac_like:
        options["alpha1"] = 0.0
    model = _model()
    optimizer = SINGD(model, lr=0.0, **options)
    _step(model, optimizer)
    # More iterations from the same statistics change nothing: the start had settled.
    monkeypatch.setattr(singd_module, "WARM_ITERATIONS", singd_module.WARM_ITERATIONS + 5)
    model_long = _model()
    longer = SINGD(model_long, lr=0.0, **options)
    _step(model_long, longer)
    for layer in optimizer.layers:
        for layout, key in zip(optimizer.layouts(layer), ("K", "C")):
            factor = optimizer.layer_state[layer.name][key]
            assert torch.isfinite(factor).all()
            dense = _dense(layout, factor)
            # In the structure: only its free entries are stored.
            assert factor.shape == (layout.numel,)
            torch.testing.assert_close(factor, longer.layer_state[layer.name][key], rtol=1e-7, atol=1e-9)
            # Not the identity any more, and invertible.
            assert torch.linalg.matrix_rank(dense) == layout.dim


def test_start_replaces_the_first_update_only(monkeypatch):
    model = _model()
    optimizer = SINGD(model, lr=0.0, T=1, factor_init="warm")
    calls = []
    original = singd_module.SINGD._initial_factors
    monkeypatch.setattr(
        singd_module.SINGD, "_initial_factors", lambda self, *args: calls.append(1) or original(self, *args)
    )
    for seed in range(3):
        _step(model, optimizer, seed)
    assert len(calls) == len(optimizer.layers)
    assert all(INITIALIZED in state for state in optimizer.layer_state.values())


def test_start_is_undone_with_a_skipped_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3)).double()
    optimizer = SINGD(model, lr=0.1, factor_init="warm")
    x = torch.randn(8, 4, dtype=torch.float64)
    model(x).square().sum().backward()
    model[1].weight.grad.fill_(float("inf"))  # a fallback parameter: found after the start
    with pytest.warns(UserWarning, match="step skipped"):
        optimizer.step()
    state = optimizer.layer_state["0"]
    assert INITIALIZED not in state
    assert torch.equal(state["K"], optimizer.layouts(optimizer.layers[0])[0].identity(dtype=torch.float64))
    assert optimizer.steps == 0


# -------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("factor_init", ["scaled_identity", "warm"])
def test_resume_is_exact_and_does_not_start_again(factor_init, monkeypatch):
    options = dict(lr=0.05, T=2, factor_init=factor_init, structures=("tril_toeplitz", "dense"), kl_clip=1e-3)
    model = _model()
    optimizer = SINGD(model, **options)
    for seed in range(3):
        _step(model, optimizer, seed)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    for seed in range(3, 6):
        _step(model, optimizer, seed)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = _model()
    resumed_model.load_state_dict(saved["model"])
    resumed = SINGD(resumed_model, **options)
    resumed.load_state_dict(saved["optimizer"])
    monkeypatch.setattr(singd_module.SINGD, "_initial_factors", lambda *args: pytest.fail("started again"))
    for seed in range(3, 6):
        _step(resumed_model, resumed, seed)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)


def test_a_run_saved_before_factor_init_existed_is_not_started_again():
    model = _model()
    paper = SINGD(model, lr=0.05, T=1)
    _step(model, paper)
    state = paper.state_dict()
    for group in state["param_groups"]:
        del group["factor_init"]
    warm = SINGD(model, lr=0.05, T=1, factor_init="warm")
    warm.load_state_dict(state)
    assert warm.param_groups[0]["factor_init"] == "warm"
    assert all(INITIALIZED in s for s in warm.layer_state.values())
    for name, saved in paper.layer_state.items():
        assert torch.equal(saved["K"], warm.layer_state[name]["K"])


# ----------------------------------------------------------------- KL clip
@pytest.mark.parametrize("batch_layers", [False, True])
def test_kl_clip_scales_every_update_by_the_hand_computed_factor(batch_layers):
    lr, kl_clip = 0.5, 1e-4
    torch.manual_seed(0)
    # (two 5 → 5 layers: a batch with batch_layers)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(),
                          nn.Linear(5, 3)).double()
    plain_model, clipped_model = copy.deepcopy(model), copy.deepcopy(model)
    options = dict(lr=lr, momentum=0.0, T=1, update_clip=None, max_factor_step=None, batch_layers=batch_layers)
    plain = SINGD(plain_model, kl_clip=None, **options)
    clipped = SINGD(clipped_model, kl_clip=kl_clip, **options)
    x, y = _batch()
    for m in (plain_model, clipped_model):
        nn.functional.cross_entropy(m(x), y).backward()
    grads = [p.grad.clone() for p in plain_model.parameters()]
    before = [p.detach().clone() for p in plain_model.parameters()]
    plain.step()
    clipped.step()
    # The unclipped step is -lr·u: ν = min(1, sqrt(κ / (lr² Σ ⟨u, g⟩))).
    updates = [(b - p.detach()) / lr for b, p in zip(before, plain_model.parameters())]
    total = lr**2 * sum((u * g).sum() for u, g in zip(updates, grads))
    nu = min(1.0, (kl_clip / total).sqrt().item())
    assert nu < 0.5
    for b, p, q in zip(before, plain_model.parameters(), clipped_model.parameters()):
        torch.testing.assert_close(b - q.detach(), nu * (b - p.detach()), rtol=1e-10, atol=1e-14)


def test_kl_clip_that_does_not_bind_leaves_the_update_unchanged():
    plain_model, clipped_model = _model(), _model()
    plain = SINGD(plain_model, lr=0.01, T=1, kl_clip=None)
    clipped = SINGD(clipped_model, lr=0.01, T=1, kl_clip=1e6)
    for seed in range(3):
        _step(plain_model, plain, seed)
        _step(clipped_model, clipped, seed)
    for p, q in zip(plain_model.parameters(), clipped_model.parameters()):
        assert torch.equal(p, q)


# -------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "options, match",
    [
        ({"factor_init": "statistics"}, r"factor_init must be one of \['identity', 'scaled_identity', 'warm'\]"),
        ({"kl_clip": 0.0}, r"kl_clip must be a number in \(0.0, inf\)"),
        ({"kl_clip": float("nan")}, "kl_clip must be a number"),
    ],
)
def test_bad_options_name_the_choices(options, match):
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=match):
        SINGD(model, **options)
    with pytest.raises(ValueError, match=match):
        SINGD(model, params=[{"params": list(model.parameters()), **options}])
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_factor_init_is_a_per_group_option():
    model = _model()
    optimizer = SINGD(
        model,
        params=[{"params": model[0].parameters(), "factor_init": "warm"}, {"params": model[2].parameters()}],
        lr=0.0,
    )
    _step(model, optimizer)
    assert INITIALIZED in optimizer.layer_state["0"] and INITIALIZED not in optimizer.layer_state["2"]


# --------------------------------------------------------------- schedules
def test_authors_warmup_values_and_pickling():
    # the authors' wrappers: "steps <= 500" etc., steps taken before this one
    schedule = lr_cov_warmup(0.01)
    assert [schedule(s) for s in (0, 500, 501, 1000, 1001, 2000, 2001, 10**6)] == pytest.approx(
        [1e-6, 1e-6, 1e-4, 1e-4, 1e-3, 1e-3, 1e-2, 1e-2]
    )
    assert pickle.loads(pickle.dumps(schedule)) == schedule
    kfac = apply_lr_cov_schedule({"lr_cov": 0.01, "lr_cov_schedule": "authors_kfac_warmup"})["lr_cov"]
    assert [kfac(s) for s in (500, 501, 1000, 1001, 1500, 1501, 2000, 2001)] == pytest.approx(
        [1e-6, 1e-5, 1e-5, 1e-4, 1e-4, 1e-3, 1e-3, 1e-2]
    )


@pytest.mark.parametrize(
    "args, match",
    [
        ((-1.0,), r"lr_cov must be a number"),
        ((0.01, (500, 400), (0.1, 0.2)), "milestones must be strictly increasing"),
        ((0.01, (500,), (0.1, 0.2)), "same length"),
        ((0.01, (500,), (-1.0,)), r"factors\[0\] must be a number"),
    ],
)
def test_warmup_validation(args, match):
    with pytest.raises(ValueError, match=match):
        LrCovWarmup(*args)


def test_lr_cov_schedule_option_in_the_factory():
    model = _model()
    optimizer = build_optimizer(model, "singd", lr_cov=0.05, lr_cov_schedule="authors_warmup")
    assert optimizer.param_groups[0]["lr_cov"] == LrCovWarmup(0.05)
    assert build_optimizer(_model(), "ikfac", lr_cov_schedule="authors_warmup").param_groups[0]["lr_cov"](0) == pytest.approx(1e-6)
    assert build_optimizer(_model(), "singd", lr_cov_schedule=None).param_groups[0]["lr_cov"] == 1e-2
    with pytest.raises(ValueError, match=r"lr_cov_schedule must be null or one of \['authors_warmup', 'authors_kfac_warmup'\]"):
        apply_lr_cov_schedule({"lr_cov_schedule": "cosine"})
    # The state holds a placeholder and the loading optimizer keeps its schedule.
    state = optimizer.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer.load_state_dict(state)
    assert optimizer.param_groups[0]["lr_cov"] == LrCovWarmup(0.05)


# --------------------------------------------------------------- app config
@pytest.mark.parametrize("optimizer", ["singd", "ingd", "ikfac"])
def test_app_config_sets_the_start_the_clip_and_the_warmup(optimizer):
    from singd_lightning.app.pipeline import build_module
    from tests.app.helpers import compose_cfg

    # without the tuned values of the default data (digits' SINGD file sets the warm start)
    cfg = compose_cfg([f"optimizer={optimizer}", "~tuned"])
    assert (cfg.optimizer.factor_init, cfg.optimizer.kl_clip, cfg.optimizer.lr_cov_schedule) == ("identity", 1e-3, None)
    cfg = compose_cfg(
        [
            f"optimizer={optimizer}",
            "~tuned",
            "optimizer.lr_cov_schedule=authors_warmup",
            "optimizer.factor_init=warm",
            "optimizer.kl_clip=1e-2",
        ]
    )
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 10))
    net.num_classes = 10
    module = build_module(cfg, net)
    built = module.configure_optimizers()["optimizer"]
    group = built.param_groups[0]
    assert group["lr_cov"] == LrCovWarmup(1e-2)
    assert (group["factor_init"], group["kl_clip"]) == ("warm", 1e-2)
    nn.functional.cross_entropy(module(torch.randn(4, 3, 2, 2)), torch.randint(0, 10, (4,))).backward()
    built.step()
    assert all(INITIALIZED in state for state in built.layer_state.values())
