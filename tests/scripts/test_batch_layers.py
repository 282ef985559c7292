"""``scripts/batch_layers.py``: the batched and the one-by-one calls compute the
same thing as the optimizer, on the groups of same-shaped layers, and a batched
call that computes something else makes the script fail."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from singd_lightning import SINGD

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
try:
    import batch_layers
finally:
    sys.path.pop(0)

TINY = ["--models", "tiny", "--repeats", "2", "--warmup", "0", "--columns", "16"]


@pytest.fixture(autouse=True)
def _keep_threads():
    """The script sets its own thread count; the rest of the session must not inherit it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("structure", ["diagonal", "block_diagonal", "hierarchical", "dense"])
def test_precondition_is_the_optimizers_arithmetic(structure):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(9, 7), torch.nn.Tanh(), torch.nn.Linear(7, 5))
    optimizer = SINGD(model, lr=0.1, structures=(structure, structure))
    torch.nn.functional.cross_entropy(model(torch.randn(16, 9)), torch.randint(0, 5, (16,))).backward()
    optimizer.step()  # the factors leave the identity
    for layer in optimizer.layers:
        layout_k, layout_c = optimizer.layouts(layer)
        state = optimizer.layer_state[layer.name]
        grad = torch.randn(layout_c.dim, layout_k.dim)
        ours = batch_layers.precondition(layout_k, layout_c, layout_k.outer_form(state["K"]),
                                         layout_c.outer_form(state["C"]), grad)
        torch.testing.assert_close(ours, optimizer._precondition(layer, grad))


def test_groups_hold_layers_of_the_same_shapes():
    groups = batch_layers.layer_groups(batch_layers.build_model("vit"), "hierarchical")
    # CCT-7: 7 blocks of (qkv, proj, fc1, fc2), four shapes, seven layers each.
    assert sorted(len(names) for _, _, names in groups) == [7, 7, 7, 7]
    assert all(names[0].startswith("blocks.0.") for _, _, names in groups)
    assert len({(k.dim, c.dim) for k, c, _ in groups}) == 4


def test_writes_every_group_and_way(tmp_path, capsys):
    out = tmp_path / "batching.json"
    assert batch_layers.main([*TINY, "--structures", "diagonal", "hierarchical", "--step", "--batch-size", "2",
                              "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    groups, totals = report["groups"], report["totals"]
    assert {(r["structure"], r["operation"]) for r in groups} == {
        (s, op) for s in ("diagonal", "hierarchical") for op in batch_layers.OPERATIONS}
    for row in groups:
        assert row["layers"] >= 2 and row["same"], row
        assert row["max_relative_difference"] <= batch_layers.TOLERANCE[torch.float32]
        assert all(row[f"{way}_ms"] > 0 for way in batch_layers.WAYS)
        assert row["batched_speedup"] == pytest.approx(row["one_by_one_ms"] / row["batched_ms"], rel=1e-2)
    for total in totals:
        members = [r for r in groups if (r["structure"], r["operation"]) == (total["structure"], total["operation"])]
        assert total["layers"] == sum(r["layers"] for r in members)
        assert total["one_by_one_ms"] == pytest.approx(sum(r["one_by_one_ms"] for r in members))
    assert [r["structure"] for r in report["steps"]] == ["diagonal", "hierarchical"]
    for r in report["steps"]:
        for way in ("layer_by_layer", "batched", "adamw"):
            assert r[f"{way}_ms"] > 0 and r[f"{way}_update_ms"] > 0
            assert r[f"{way}_operations"] > 0 and r[f"{way}_update_operations"] > 0
        # batching removes operations, at updates more than between them
        assert r["batched_operations"] < r["layer_by_layer_operations"]
        assert r["batched_update_operations"] < r["layer_by_layer_update_operations"]
        assert r["batched_backward_operations"] < r["layer_by_layer_backward_operations"]
    printed = capsys.readouterr().out
    assert "| tiny | hierarchical | precondition |" in printed and "Whole optimizer.step()" in printed
    assert torch.get_num_threads() == 1  # (restored by the fixture)


def test_train_steps_are_timed_both_ways(tmp_path, capsys):
    out = tmp_path / "train.json"
    assert batch_layers.main(["--models", "tiny", "--no-operations", "--train-step", "--rounds", "2", "--warmup", "0",
                              "--batch-size", "2", "--structures", "hierarchical", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["train_steps"]
    assert [(r["structure"], r["T"]) for r in rows] == [("hierarchical", 1), ("hierarchical", 10)]
    for r in rows:
        assert r["off_x_adamw"] > 0 and r["on_over_off"] == pytest.approx(r["on_x_adamw"] / r["off_x_adamw"], rel=1e-2)
    assert "Whole training steps over AdamW's" in capsys.readouterr().out


def test_a_batched_call_that_differs_fails_the_script(monkeypatch, capsys):
    original = batch_layers.operation_calls

    def wrong_batch(op, layout_k, layout_c, layers):
        calls = original(op, layout_k, layout_c, layers)
        right = calls["batched"]
        calls["batched"] = lambda: [r * 1.01 for r in right()]  # 1 % off
        return calls

    monkeypatch.setattr(batch_layers, "operation_calls", wrong_batch)
    assert batch_layers.main([*TINY, "--structures", "diagonal"]) == 1
    assert "DIFFERENT tiny diagonal precondition" in capsys.readouterr().out


def test_refuses_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        batch_layers.main([*TINY, "--columns", "0"])
    assert "--columns" in capsys.readouterr().err
