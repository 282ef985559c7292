"""The Kronecker optimizers on models sharded with FSDP2 (``fully_shard``, two gloo
processes on CPU): after a few steps the full parameters equal one process on
the joint batch, each layer's private state lives on its owner only, ranks skip
non-finite steps together, and the full state dict resumes exactly, sharded or
not, also through ``torch.distributed.checkpoint``. Also the distributed factor
work under DDP (``distributed_work=True``).

All configurations run in one pair of processes (starting them dominates the
time); the single-process references run in the test process.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from singd_lightning import KFAC, SINGD
from singd_lightning.optim.distributed import (
    assign_owners,
    is_sharded,
    load_distributed_checkpoint,
    optimizer_state_bytes,
    shard_rows,
    sharded_state_dict,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

WORLD = 2
STEPS = 4
BATCH = 8  # the joint batch; rank r takes samples r::WORLD

# name: (optimizer class, options). Float64 models: the comparison is then
# limited by summation order only.
CONFIGS = {
    "dense_T1": (SINGD, dict(lr=0.05, T=1, structures="dense", weight_decay=1e-2)),
    "hierarchical_T2": (SINGD, dict(lr=0.05, T=2, structures="hierarchical", alpha1=0.3)),
    "diagonal_kl": (SINGD, dict(lr=0.05, T=1, structures="diagonal", kl_clip=1e-4)),
    "toeplitz_T1": (SINGD, dict(lr=0.05, T=1, structures="tril_toeplitz", fallback="sgd")),
    "ikfac_T2": (SINGD, dict(lr=0.05, T=2, structures="block_diagonal", kfac_like=True)),
    # Same-shaped layers in batches, statistics projected at the update.
    "hierarchical_T2_batched": (SINGD, dict(lr=0.05, T=2, structures="hierarchical", alpha1=0.3, batch_layers=True)),
    "diagonal_kl_batched": (SINGD, dict(lr=0.05, T=1, structures="diagonal", kl_clip=1e-4, batch_layers=True)),
    "dense_T1_batched": (SINGD, dict(lr=0.05, T=1, structures="dense", batch_layers=True)),
    "kfac_T1": (KFAC, dict(lr=0.05, T=1, damping=1e-2)),
    "kfac_T2": (KFAC, dict(lr=0.05, T=2, damping=1e-2, kl_clip=1e-3)),
}


def _model(width: int = 9) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, width), nn.LayerNorm(width),
        # three same-shaped layers: with batch_layers a batch, and on two ranks at
        # least two of them with one owner (a batch there too)
        nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
        nn.Linear(width, 5, bias=False),
    ).double()


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 3, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 5, (BATCH,), generator=g)


def _train(model: nn.Module, optimizer, steps: range, rank: int = 0, world: int = 1) -> None:
    for step in steps:
        x, y = _data(step)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[rank::world]), y[rank::world]).backward()
        optimizer.step()


def _full(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()}


def _shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for module in model:
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            fully_shard(module)
    return fully_shard(model)


def _embedding_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(11, 6, padding_idx=0), nn.Flatten(), nn.Linear(24, 5)).double()


def _shard_embedding(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    fully_shard(model[0])
    fully_shard(model[2])
    return fully_shard(model)


def _train_tokens(model: nn.Module, optimizer, rank: int = 0, world: int = 1) -> None:
    for step in range(3):
        g = torch.Generator().manual_seed(200 + step)
        x, y = torch.randint(0, 11, (BATCH, 4), generator=g), torch.randint(0, 5, (BATCH,), generator=g)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[rank::world]), y[rank::world]).backward()
        optimizer.step()


def _own_tensors(state_dict: dict) -> bool:
    kronecker = state_dict["kronecker"]
    tensors = [*kronecker["update_norm_avg"].values()] + [v for s in kronecker["layers"].values() for v in s.values()]
    return bool(tensors) and all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in tensors)


def _worker(rank: int, store: str, out: str) -> None:
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for name, (cls, options) in CONFIGS.items():
            model = _shard(_model())
            optimizer = cls(model, **options)
            _train(model, optimizer, range(STEPS), rank, WORLD)
            results[name] = {
                "params": _full(model),
                "keys": {layer: sorted(state) for layer, state in optimizer.layer_state.items()},
                "owners": dict(optimizer._distributor.owner),
                # every state tensor its own storage (a batch's rows are copied), full and part
                "own_tensors": [_own_tensors(state_dict) for state_dict in (optimizer.state_dict(),
                                                                              sharded_state_dict(optimizer))],
            }
        # Memory: dense factors of wider layers.
        model = _shard(_model(width=32))
        optimizer = SINGD(model, lr=0.05, T=1, structures="dense")
        _train(model, optimizer, range(2), rank, WORLD)
        results["bytes"] = optimizer_state_bytes(optimizer)

        # Non-finite gradients on one rank's shard only: every rank skips.
        model = _shard(_model())
        optimizer = SINGD(model, lr=0.05, T=2, structures="dense")
        _train(model, optimizer, range(1), rank, WORLD)
        before = _full(model)
        x, y = _data(1)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[rank::WORLD]), y[rank::WORLD]).backward()
        if rank == 0:
            model[3].weight.grad.to_local()[0, 0] = float("nan")
        optimizer.step()
        results["skip"] = {"skipped": optimizer.skipped_steps, "steps": optimizer.steps,
                           "unchanged": all(torch.equal(v, _full(model)[k]) for k, v in before.items())}
        # Non-finite statistics on one rank only (finite gradients), in the next
        # collecting step: every rank sees the reduced sums and skips.
        _train(model, optimizer, range(2, 3), rank, WORLD)
        before = _full(model)
        x, y = _data(3)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[rank::WORLD]), y[rank::WORLD]).backward()
        if rank == 0:
            optimizer._stats["3"][0][0] = float("inf")
        factors = {name: dict(state) for name, state in optimizer.layer_state.items()}
        optimizer.step()
        results["skip_statistics"] = {
            "skipped": optimizer.skipped_steps, "steps": optimizer.steps,
            "unchanged": all(torch.equal(v, _full(model)[k]) for k, v in before.items()),
            "factors_unchanged": all(optimizer.layer_state[n][k] is v for n, state in factors.items() for k, v in state.items()),
        }

        # Checkpoints: the full state dict after 2 steps, resumed sharded.
        model = _shard(_model())
        optimizer = SINGD(model, lr=0.05, T=1, structures="dense", alpha1=0.5)
        _train(model, optimizer, range(2), rank, WORLD)
        # (a copy, as a file would hold: the state refers to tensors that steps update in place)
        state, params = copy.deepcopy(optimizer.state_dict()), _full(model)
        _train(model, optimizer, range(2, 4), rank, WORLD)
        resumed_model = _model()
        resumed_model.load_state_dict(params)
        resumed_model = _shard(resumed_model)
        resumed = SINGD(resumed_model, lr=0.05, T=1, structures="dense", alpha1=0.5)
        resumed.load_state_dict(copy.deepcopy(state))  # (loading keeps its "step" tensors)
        _train(resumed_model, resumed, range(2, 4), rank, WORLD)
        results["checkpoint"] = {"owners": dict(optimizer._distributor.owner), "state": state, "params": params, "continued": _full(model),
                                 "resumed": _full(resumed_model), "bytes_equal": optimizer_state_bytes(resumed) == optimizer_state_bytes(optimizer)}

        # torch.distributed.checkpoint: each rank's part (its layers, its shards),
        # or the full state dict (written once: the same on every rank); both
        # read back whole.
        model = _shard(_model())
        optimizer = SINGD(model, lr=0.05, T=1, structures="dense", alpha1=0.5)
        _train(model, optimizer, range(2), rank, WORLD)
        part = sharded_state_dict(optimizer)
        results["dcp_part"] = {"layers": sorted(part["kronecker"]["layers"]),
                               "sharded_moments": all(is_sharded(v) for e in part["state"].values() for k, v in e.items() if k != "step")}
        for folder, state in (("dcp", part), ("dcp_full", optimizer.state_dict())):
            dcp.save({"model": get_model_state_dict(model), "optim": state}, checkpoint_id=Path(out) / folder)
        _train(model, optimizer, range(2, 4), rank, WORLD)
        for folder in ("dcp", "dcp_full"):
            resumed_model = _shard(_model())
            resumed = SINGD(resumed_model, lr=0.05, T=1, structures="dense", alpha1=0.5)
            loaded = {"model": get_model_state_dict(resumed_model)}
            dcp.load(loaded, checkpoint_id=Path(out) / folder)
            set_model_state_dict(resumed_model, loaded["model"])
            load_distributed_checkpoint(resumed, Path(out) / folder)
            _train(resumed_model, resumed, range(2, 4), rank, WORLD)
            results[folder] = {"continued": _full(model), "resumed": _full(resumed_model)}

        # An embedding (its weight's rows are the input side of Ĝ).
        model = _shard_embedding(_embedding_model())
        _train_tokens(model, SINGD(model, lr=0.05, T=1, structures="dense"), rank, WORLD)
        results["embedding"] = _full(model)

        # DDP: distributed factor work equals the replicated work.
        ddp = {}
        for cls, key in ((SINGD, "K"), (KFAC, "A_inv")):
            for mode in (False, True):
                model = nn.parallel.DistributedDataParallel(_model())
                optimizer = cls(model, lr=0.05, T=1, distributed_work=mode)
                _train(model, optimizer, range(STEPS), rank, WORLD)
                ddp[cls.__name__, mode] = {"params": _full(model.module), "bytes": optimizer_state_bytes(optimizer),
                                           "factors": {n: s[key].clone() for n, s in optimizer.layer_state.items()}}
        for batch in (False, True):  # batches of the owned layers, statistics projected by their owners
            model = nn.parallel.DistributedDataParallel(_model())
            optimizer = SINGD(model, lr=0.05, T=1, structures="hierarchical", distributed_work=batch,
                              batch_layers=batch)
            _train(model, optimizer, range(STEPS), rank, WORLD)
            ddp["SINGD hierarchical", batch] = {"params": _full(model.module),
                                                "factors": {n: s["K"].clone() for n, s in optimizer.layer_state.items()}}
        results["ddp"] = ddp
        torch.save(results, Path(out) / f"rank{rank}.pt")
        dist.barrier()  # both ranks done before either tears gloo down
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(str(out / "store"), str(out)), nprocs=WORLD, join=True)
    return [{**torch.load(out / f"rank{r}.pt", weights_only=False), "out": out} for r in range(WORLD)]


def _assert_close(actual: dict, expected: dict) -> None:
    for key, value in expected.items():
        error = (actual[key] - value).norm() / value.norm()
        assert error < 1e-9, (key, error.item())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sharded_training_equals_one_process_on_the_joint_batch(ranks, name):
    cls, options = CONFIGS[name]
    model = _model()
    optimizer = cls(model, **options)
    _train(model, optimizer, range(STEPS))
    initial = _model().state_dict()
    for rank in ranks:
        _assert_close(rank[name]["params"], _full(model))
    # (the steps moved every parameter: the comparison is not vacuous)
    assert all(not torch.equal(initial[k], v) for k, v in _full(model).items())


def test_checkpoints_of_batched_layers_hold_their_own_tensors(ranks):
    for rank in ranks:
        assert rank["hierarchical_T2_batched"]["own_tensors"] == [True, True]
        assert rank["diagonal_kl_batched"]["own_tensors"] == [True, True]


def test_each_layer_keeps_its_private_state_on_its_owner_only(ranks):
    for name, (cls, options) in CONFIGS.items():
        owners = ranks[0][name]["owners"]
        assert owners == ranks[1][name]["owners"]
        assert set(owners.values()) == {0, 1}  # the work is split
        for layer, owner in owners.items():
            owned, other = ranks[owner][name]["keys"][layer], ranks[1 - owner][name]["keys"][layer]
            # SINGD's hooks need structured K and C everywhere; dense ones are
            # projected by their owner, and KFAC's statistics need nothing.
            assert other == (["C", "K"] if cls is SINGD and options["structures"] != "dense" else [])
            # (IKFAC has no Riemannian momenta: nothing private)
            assert set(other) < set(owned) or (name.startswith("ikfac") and other == owned)


def test_per_rank_optimizer_state_falls_with_sharding(ranks):
    model = _model(width=32)
    optimizer = SINGD(model, lr=0.05, T=1, structures="dense")
    _train(model, optimizer, range(2))
    unsharded = optimizer_state_bytes(optimizer)
    # Nothing is replicated: every factor, momentum and moment lives on one rank
    # (dense factors on their layer's owner, per-parameter state in shards) ...
    # (but for AdamW's 0-dim step counts, 4 bytes per fallback parameter and rank).
    assert sum(rank["bytes"] for rank in ranks) == unsharded + 2 * 4
    # ... so each rank holds less (how much less depends on the owners' balance).
    for rank in ranks:
        assert rank["bytes"] < 0.75 * unsharded, (rank["bytes"], unsharded)


def test_ranks_skip_a_step_with_non_finite_gradients_together(ranks):
    for rank in ranks:
        assert rank["skip"] == {"skipped": 1, "steps": 1, "unchanged": True}


def test_ranks_skip_a_step_with_non_finite_statistics_on_one_rank_together(ranks):
    for rank in ranks:
        assert rank["skip_statistics"] == {"skipped": 2, "steps": 2, "unchanged": True, "factors_unchanged": True}


def test_full_state_dict_resumes_exactly_sharded_and_unsharded(ranks):
    result = ranks[0]["checkpoint"]
    assert ranks[1]["checkpoint"]["bytes_equal"] and result["bytes_equal"]
    # The same full state on every rank, in the unsharded format.
    for key, value in result["state"]["kronecker"]["layers"].items():
        for k, v in value.items():
            assert torch.equal(v, ranks[1]["checkpoint"]["state"]["kronecker"]["layers"][key][k])
    # Resumed sharded: exactly the run that went on.
    for rank in ranks:
        for key, value in rank["checkpoint"]["continued"].items():
            assert torch.equal(rank["checkpoint"]["resumed"][key], value), key
    # Resumed by one process: the same up to summation order.
    model = _model()
    model.load_state_dict(result["params"])
    optimizer = SINGD(model, lr=0.05, T=1, structures="dense", alpha1=0.5)
    optimizer.load_state_dict(result["state"])
    _train(model, optimizer, range(2, 4))
    _assert_close(result["continued"], _full(model))
    # ... and an unsharded state loads into the sharded format's checks.
    assert optimizer.state_dict()["kronecker"]["layers"].keys() == result["state"]["kronecker"]["layers"].keys()


@pytest.mark.parametrize("folder", ["dcp", "dcp_full"])
def test_distributed_checkpoint_resumes_exactly_sharded_and_unsharded(ranks, folder):
    # Each rank's part holds the layers it owns and the moments' shards only.
    owners = ranks[0]["checkpoint"]["owners"]
    for r, rank in enumerate(ranks):
        assert rank["dcp_part"] == {"layers": sorted(n for n, o in owners.items() if o == r), "sharded_moments": True}
    # Resumed sharded from the folder: exactly the run that went on.
    for rank in ranks:
        for key, value in rank[folder]["continued"].items():
            assert torch.equal(rank[folder]["resumed"][key], value), key
    # The same folder read by one process without a process group (another
    # world size): the full state, the same up to summation order.
    folder = ranks[0]["out"] / folder
    model = _model()
    loaded = {"model": model.state_dict()}
    dcp.load(loaded, checkpoint_id=folder)
    model.load_state_dict(loaded["model"])
    optimizer = SINGD(model, lr=0.05, T=1, structures="dense", alpha1=0.5)
    load_distributed_checkpoint(optimizer, folder)
    assert optimizer.steps == 2 and optimizer.state  # the AdamW moments are back
    _train(model, optimizer, range(2, 4))
    _assert_close(ranks[0][folder.name]["continued"], _full(model))
    with pytest.raises(ValueError, match="holds no entry 'optimizer'"):
        load_distributed_checkpoint(optimizer, folder, key="optimizer")


@pytest.mark.parametrize("method", ["SINGD", "KFAC"])
def test_distributed_work_under_ddp_equals_replicated_work(ranks, method):
    for rank in ranks:
        replicated, distributed = rank["ddp"][method, False], rank["ddp"][method, True]
        _assert_close(distributed["params"], replicated["params"])
        # Every rank holds the factors it preconditions with (K, C; KFAC's inverses).
        for key, value in replicated["factors"].items():
            torch.testing.assert_close(distributed["factors"][key], value, rtol=1e-12, atol=1e-14)
        assert distributed["bytes"] < replicated["bytes"]


def test_batched_distributed_work_under_ddp_equals_replicated_layer_by_layer_work(ranks):
    for rank in ranks:
        replicated, batched = rank["ddp"]["SINGD hierarchical", False], rank["ddp"]["SINGD hierarchical", True]
        _assert_close(batched["params"], replicated["params"])
        for key, value in replicated["factors"].items():
            torch.testing.assert_close(batched["factors"][key], value, rtol=1e-12, atol=1e-14)


def test_sharded_embedding_equals_one_process(ranks):
    model = _embedding_model()
    _train_tokens(model, SINGD(model, lr=0.05, T=1, structures="dense"))
    for rank in ranks:
        _assert_close(rank["embedding"], _full(model))


def test_owners_balance_the_cost_and_shards_split_like_torch_chunk():
    assert assign_owners([8.0, 1.0, 1.0, 6.0], 2) == [0, 1, 1, 1]
    assert assign_owners([1.0, 1.0, 1.0], 4) == [0, 1, 2]
    for rows in (1, 5, 7, 8):
        for world in (1, 2, 3, 4):
            assert shard_rows(rows, world) == [len(c) for c in torch.arange(rows).chunk(world)] + [0] * (
                world - len(torch.arange(rows).chunk(world))
            )


def test_a_sharded_model_on_one_rank_equals_the_unsharded_one(tmp_path):
    # fully_shard on one rank still makes DTensors: they take the owners' path.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = _shard(_model())
        optimizer = SINGD(model, lr=0.05, T=1, structures="dense")
        _train(model, optimizer, range(2))
        sharded = _full(model)
    finally:
        dist.destroy_process_group()
    model = _model()
    _train(model, SINGD(model, lr=0.05, T=1, structures="dense"), range(2))
    _assert_close(sharded, _full(model))
