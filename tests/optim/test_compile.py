"""SINGD/KFAC on ``torch.compile``d models: same layer names and statistics as eager."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

from singd_lightning.optim import KFAC, SINGD
from singd_lightning.optim.base import unwrap_model

ROOT = Path(__file__).resolve().parents[2]


def _vgg() -> nn.Sequential:
    """Differently shaped Conv2d and Linear layers (each a recompile of a per-layer
    graph if the hooks broke the model's graph)."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 2 * 2, 12), nn.ReLU(), nn.Linear(12, 5),
    )  # fmt: skip


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    torch.manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@pytest.mark.parametrize(
    ("method", "T", "backend", "in_place"),
    [
        (SINGD, 1, "eager", False),
        (SINGD, 2, "aot_eager", True),
        (KFAC, 1, "aot_eager", False),
        (KFAC, 3, "eager", False),
    ],
)
def test_compiled_model_trains_like_eager_in_one_graph(method, T: int, backend: str, in_place: bool):
    torch.manual_seed(0)
    eager = _vgg()
    compiled_model = copy.deepcopy(eager)
    if in_place:  # nn.Module.compile
        compiled_model.compile(backend=backend)
        compiled = compiled_model
    else:
        compiled = torch.compile(compiled_model, backend=backend)
    kwargs = dict(lr=0.05, T=T) if method is SINGD else dict(lr=0.05, T=T, damping=1e-3)
    if method is SINGD:
        kwargs["structures"] = ("dense", "diagonal")
    opt_eager, opt_compiled = method(eager, **kwargs), method(compiled, **kwargs)
    _train(eager, opt_eager, 4)
    _train(compiled, opt_compiled, 4)
    assert opt_compiled.steps == opt_eager.steps == 4
    for p, q in zip(eager.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    for name, state in opt_eager.layer_state.items():
        for key, value in state.items():
            torch.testing.assert_close(opt_compiled.layer_state[name][key], value, rtol=1e-5, atol=1e-6)
    # One graph for the whole model, compiled once: no graph break at the hooks, and
    # no recompile per layer shape or per step (collecting or not).
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] == 1


def test_compiled_model_keys_state_like_the_plain_model():
    model = _vgg()
    compiled = torch.compile(model, backend="eager")
    assert unwrap_model(compiled) is model
    assert unwrap_model(nn.DataParallel(torch.compile(nn.DataParallel(model), backend="eager"))) is model
    optimizer = SINGD(compiled, T=1)
    assert [layer.name for layer in optimizer.layers] == ["0", "2", "5", "8", "10"]
    _train(compiled, optimizer, 2)
    plain = SINGD(copy.deepcopy(model), T=1)
    plain.load_state_dict(optimizer.state_dict())
    assert plain.steps == 2
    for name, state in optimizer.layer_state.items():
        for key, value in state.items():
            torch.testing.assert_close(plain.layer_state[name][key], value)



def test_benchmark_compiles_every_model(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import benchmark
    finally:
        sys.path.pop(0)
    out = tmp_path / "bench.json"
    common = ["--models", "convmixer", "--methods", "ours", "--structures", "diagonal", "--T", "1",
              "--batch-size", "2", "--steps", "1", "--no-peak", "--compile", "--compile-backend", "eager"]  # fmt: skip
    with pytest.raises(SystemExit):
        benchmark.main([*common, "--warmup", "0"])
    assert "--warmup must be at least 1 with --compile" in capsys.readouterr().err
    benchmark.main([*common, "--warmup", "1", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert {(r["method"], r["compile"]) for r in rows} == {("adamw", "eager"), ("sgd", "eager"), ("ours", "eager")}
    assert all(r["error"] == "" and r["step_ms"] > 0 for r in rows)
    assert counters["stats"]["unique_graphs"] >= 1  # the models ran compiled (eager: no graph)
