"""Distributed work of the Kronecker optimizers: which rank owns which layer, and
the collectives that move factors, gradients and updates between ranks.

Two settings use it (see :class:`LayerDistributor`):

* **Sharded parameters** (FSDP2, ``torch.distributed.fsdp.fully_shard``: every
  parameter a ``DTensor`` sharded on dim 0). The curvature hooks see the
  unsharded forward and backward passes, so the statistics are collected and
  summed over ranks exactly as under DDP. Each Kronecker layer has one *owner*
  rank, chosen to balance the factor-update cost; only the owner keeps the
  layer's large private state (SINGD's Riemannian momenta, KFAC's factors and
  inverses), computes its factor update and preconditions its gradient: one
  ``all_to_all`` brings the row shards of the owned layers' gradients to their
  owners, one ``all_to_all`` returns the preconditioned updates as row shards.
  The first-order fallback works elementwise on the local shards.
* **Replicated parameters with distributed work** (DDP; by default with two or
  more Kronecker layers, see :func:`make_distributor`):
  the owner alone updates a layer's factors; the factors that every rank needs
  to precondition its (replicated) gradient are shared with one ``all_gather``
  per update step (per factor dtype), so the factor work is split across ranks
  as in KAISA.

In both, the state that every rank needs is replicated and refreshed after
each factor update by that one ``all_gather``: SINGD's structured ``K`` and
``C``, which the hooks read (dense ones stay on their owner under sharding: the
hooks then collect ``X Xᵀ`` and the owner projects it), and under DDP the
factors each rank preconditions with. The owner's private state never leaves
it except in a full state dict.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from singd_lightning.optim.curvature import EmbeddingLayer, KroneckerLayer
from singd_lightning.optim.kl_clip import kl_clip_scale


try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # a build without distributed support
    DTensor, Shard = None, None


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (a parameter or gradient sharded by FSDP2)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """This rank's part of ``t``: the local shard of a ``DTensor``, else ``t``."""
    return t.to_local() if is_sharded(t) else t


def assign_owners(costs: list[float], world: int) -> list[int]:
    """An owner rank per item, balancing the summed cost per rank: largest cost
    first, each to the least loaded rank (ties: lowest index). Deterministic, so
    every rank computes the same assignment."""
    loads = [0.0] * world
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        owners[index] = rank
        loads[rank] += costs[index]
    return owners


def shard_rows(rows: int, world: int) -> list[int]:
    """Rows of dim 0 on each rank under ``Shard(0)``: ``torch.chunk``'s split, as
    FSDP2 and ``DTensor`` use (the last ranks may hold fewer or none)."""
    size = -(-rows // world)
    return [max(0, min(size, rows - rank * size)) for rank in range(world)]


def _full_gradient_matrix(layer: KroneckerLayer, grads: list[Tensor]) -> Tensor:
    """The augmented gradient ``Ĝ`` of ``layer`` from the full gradients of its
    parameters (as :meth:`KroneckerLayer.gradient_matrix`)."""
    if isinstance(layer, EmbeddingLayer):
        return grads[0].mT
    mat = grads[0].flatten(start_dim=1)
    if layer.has_bias:
        mat = torch.cat([mat, grads[1].to(mat.dtype).unsqueeze(1)], dim=1)
    return mat


def _split_full(layer: KroneckerLayer, mat: Tensor) -> list[Tensor]:
    """An augmented ``(d_o, d_K)`` matrix as full tensors shaped like the layer's
    parameters (as :meth:`KroneckerLayer.split`, for sharded parameters)."""
    params = layer.params
    if isinstance(layer, EmbeddingLayer):
        update = mat.mT.contiguous()
        if layer.module.padding_idx is not None:
            update[layer.module.padding_idx] = 0.0
        return [update]
    if layer.has_bias:
        return [mat[:, :-1].reshape(params[0].shape), mat[:, -1].reshape(params[1].shape)]
    return [mat.reshape(params[0].shape)]


class LayerDistributor:
    """Owner assignment of Kronecker layers and the collectives of distributed work.

    Args:
        layers: The optimizer's Kronecker layers (the same list on every rank).
        costs: A factor-update cost per layer, to balance the owners.
        shared_keys: Per layer, the state keys every rank keeps; the other keys
            live on the layer's owner only.
        sharded: Whether the parameters are sharded ``DTensor`` s (FSDP2): the
            owners then also precondition the gradients.

    The ``optimizer`` its methods take is the
    :class:`~singd_lightning.optim.base.KroneckerOptimizer` that owns it (typed as
    ``torch.optim.Optimizer``: ``base`` imports this module, not the reverse).
    """

    def __init__(
        self, layers: list[KroneckerLayer], costs: list[float], shared_keys: dict[str, tuple[str, ...]], sharded: bool
    ) -> None:
        self.world = dist.get_world_size()
        self.rank = dist.get_rank()
        self.owner = {layer.name: rank for layer, rank in zip(layers, assign_owners(costs, self.world))}
        self.shared_keys = dict(shared_keys)
        self.sharded = sharded
        #: Whether a state dict is the full state (:meth:`checkpoint_state`);
        #: :func:`sharded_state_dict` turns it off for one call.
        self.full_checkpoints = True
        if sharded:
            for layer in layers:
                for p in layer.params:
                    _check_placement(layer.name, p, self.world)

    def owns(self, name: str) -> bool:
        """Whether this rank owns the layer called ``name``."""
        return self.owner[name] == self.rank

    def private_keys_dropped(self, name: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """``state`` of layer ``name`` as this rank keeps it: whole on its owner,
        the shared keys elsewhere."""
        if self.owns(name):
            return state
        return {key: value for key, value in state.items() if key in self.shared_keys[name]}

    # ------------------------------------------------------------ factors
    def share_factors(self, optimizer: Optimizer, names: list[str], counters: list[int]) -> list[int]:
        """Give every rank the shared state of the layers ``names`` from their
        owners, and sum ``counters`` over ranks: one ``all_gather`` per dtype of
        the shared tensors. Replaces the non-owned layers' state dicts (new
        dicts: a step's snapshot keeps the old ones)."""
        items: dict[torch.dtype, list[list[tuple[str, str, Tensor]]]] = {}
        for name in names:
            owner = self.owner[name]
            for key in self.shared_keys[name]:
                value = optimizer.layer_state[name].get(key)
                if value is not None:
                    items.setdefault(value.dtype, [[] for _ in range(self.world)])[owner].append((name, key, value))
        # The counters travel with the float32 tensors (exact: they are small).
        per_rank = items.setdefault(torch.float32, [[] for _ in range(self.world)])
        totals = [0] * len(counters)
        device = optimizer.layers[0].weight.device
        for dtype, per_rank in items.items():
            extra = len(counters) if dtype == torch.float32 else 0
            sizes = [sum(t.numel() for _, _, t in owned) + extra for owned in per_rank]
            width = max(sizes)
            if width == 0:
                continue
            mine = [t.reshape(-1) for _, _, t in per_rank[self.rank]]
            if extra:
                mine.append(torch.tensor(counters, dtype=dtype, device=device))
            chunk = torch.zeros(width, dtype=dtype, device=device)
            if mine:
                flat = torch.cat([t.to(device) for t in mine])
                chunk[: flat.numel()] = flat
            gathered = torch.empty(width * self.world, dtype=dtype, device=device)
            _all_gather(gathered, chunk)
            for rank, owned in enumerate(per_rank):
                offset = rank * width
                for name, key, value in owned:
                    if rank != self.rank:
                        # A copy: a view would keep the whole gathered buffer alive.
                        new = gathered[offset:offset + value.numel()].view_as(value).clone().to(value.device)
                        optimizer.layer_state[name] = {**optimizer.layer_state[name], key: new}
                    offset += value.numel()
                if extra:
                    counts = gathered[offset:offset + extra].tolist()
                    totals = [total + int(count) for total, count in zip(totals, counts)]
        return totals

    # ------------------------------------------------------- sharded updates
    def sharded_updates(
        self, optimizer: Optimizer, with_grad: set[int], pending_avg: dict[str, Tensor], clip_flags: list[Tensor]
    ) -> dict[int, Tensor]:
        """The preconditioned update of every sharded Kronecker parameter whose id
        is in ``with_grad``, as ``DTensor`` s shaped and sharded like it.

        The owners precondition (spike guard included) the full gradients they
        receive, same-shaped layers in batches where the optimizer batches them;
        the KL clip's sum over layers is reduced over ranks (one small
        ``all_reduce``, only with ``kl_clip``) and scales every rank's shards.
        """
        layers = [layer for layer in optimizer.layers if any(id(p) in with_grad for p in layer.params)]
        if not layers:
            return {}
        grads = [local(p.grad) if p.grad is not None else None for layer in layers for p in layer.params]
        dtype = _common_dtype([g for g in grads if g is not None])
        device = local(layers[0].weight).device
        full = self._gather_to_owners(layers, dtype, device)
        natural: dict[str, list[Tensor]] = {}
        kl_sums: dict[float, Tensor] = {}
        owned = [layer for layer in layers if self.owns(layer.name)]
        matrices = {
            layer.name: _full_gradient_matrix(layer, [g.to(p.dtype) for g, p in zip(full[layer.name], layer.params)])
            for layer in owned
        }
        # (in batches of same-shaped layers where the optimizer batches them)
        for batch, grads, updates in optimizer._preconditioned(owned, matrices):
            updates = optimizer._guarded_updates(batch, updates, pending_avg, clip_flags)
            kl_clip = batch[0].group["kl_clip"]
            if kl_clip is not None:
                term = optimizer._kl_term(batch, updates, grads)
                kl_sums[kl_clip] = kl_sums[kl_clip] + term if kl_clip in kl_sums else term
            for layer, update in zip(batch, updates.unbind()):
                natural[layer.name] = _split_full(layer, update)
        shards = self._scatter_from_owners(layers, natural, dtype, device)
        scales = self._kl_scales(layers, kl_sums, device)
        updates = {}
        for layer in layers:
            scale = scales.get(layer.group["kl_clip"])
            for p, shard in zip(layer.params, shards[layer.name]):
                if id(p) not in with_grad:
                    continue
                shard = shard.to(p.dtype)
                if scale is not None:
                    shard.mul_(scale.to(shard.dtype))
                updates[id(p)] = DTensor.from_local(
                    shard, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
                )
        return updates

    def _gather_to_owners(self, layers: list[KroneckerLayer], dtype: torch.dtype, device: torch.device) -> dict[str, list[Tensor]]:
        """Full parameter gradients of the owned ``layers`` (one ``all_to_all``): a
        missing gradient travels as zeros, as :meth:`KroneckerLayer.gradient_matrix`
        counts it."""
        send = [[] for _ in range(self.world)]
        receive_sizes = [0] * self.world
        for layer in layers:
            owner = self.owner[layer.name]
            for p in layer.params:
                g = local(p.grad) if p.grad is not None else torch.zeros_like(local(p))
                send[owner].append(g.reshape(-1).to(dtype))
                if owner == self.rank:
                    row = p.shape[1:].numel()
                    for rank, rows in enumerate(shard_rows(p.shape[0], self.world)):
                        receive_sizes[rank] += rows * row
        received = self._all_to_all(send, receive_sizes, dtype, device)
        pieces: dict[str, list[list[Tensor]]] = {}
        offsets = [0] * self.world
        owned = [layer for layer in layers if self.owns(layer.name)]
        for rank in range(self.world):
            for layer in owned:
                parts = pieces.setdefault(layer.name, [[] for _ in layer.params])
                for i, p in enumerate(layer.params):
                    rows = shard_rows(p.shape[0], self.world)[rank]
                    numel = rows * p.shape[1:].numel()
                    parts[i].append(received[rank][offsets[rank]:offsets[rank] + numel].view(rows, *p.shape[1:]))
                    offsets[rank] += numel
        return {name: [torch.cat(rows, dim=0) for rows in parts] for name, parts in pieces.items()}

    def _scatter_from_owners(
        self, layers: list[KroneckerLayer], natural: dict[str, list[Tensor]], dtype: torch.dtype, device: torch.device
    ) -> dict[str, list[Tensor]]:
        """Each rank's row shards of the owners' full updates (one ``all_to_all``)."""
        send = [[] for _ in range(self.world)]
        receive_sizes = [0] * self.world
        for layer in layers:
            owner = self.owner[layer.name]
            for i, p in enumerate(layer.params):
                receive_sizes[owner] += local(p).numel()
                if owner == self.rank:
                    for rank, rows in enumerate(natural[layer.name][i].to(dtype).split(shard_rows(p.shape[0], self.world))):
                        send[rank].append(rows.reshape(-1))
        received = self._all_to_all(send, receive_sizes, dtype, device)
        offsets = [0] * self.world
        shards = {}
        for layer in layers:
            owner = self.owner[layer.name]
            out = []
            for p in layer.params:
                shard = local(p)
                out.append(received[owner][offsets[owner]:offsets[owner] + shard.numel()].view(shard.shape))
                offsets[owner] += shard.numel()
            shards[layer.name] = out
        return shards

    def _all_to_all(self, send: list[list[Tensor]], receive_sizes: list[int], dtype: torch.dtype, device: torch.device) -> list[Tensor]:
        """Send ``send[r]`` (flat pieces) to rank ``r``; the pieces from each rank."""
        send_sizes = [sum(t.numel() for t in pieces) for pieces in send]
        flat = [t for pieces in send for t in pieces]
        inputs = torch.cat(flat) if flat else torch.empty(0, dtype=dtype, device=device)
        output = torch.empty(sum(receive_sizes), dtype=dtype, device=device)
        dist.all_to_all_single(output, inputs, receive_sizes, send_sizes)
        return list(output.split(receive_sizes))

    def _kl_scales(self, layers: list[KroneckerLayer], kl_sums: dict[float, Tensor], device: torch.device) -> dict[float, Tensor]:
        """KFAC's KL-clip scale per ``kl_clip`` value, from the owners' sums of the
        layers' terms (one small ``all_reduce``)."""

        values = sorted({layer.group["kl_clip"] for layer in layers if layer.group["kl_clip"] is not None})
        if not values:
            return {}
        # In float64: a tiny vector, and the sums keep the terms' precision.
        zero = torch.zeros((), dtype=torch.float64, device=device)
        totals = torch.stack([kl_sums.get(v, zero).to(device=device, dtype=torch.float64) for v in values])
        dist.all_reduce(totals)
        return {v: kl_clip_scale(v, [total]) for v, total in zip(values, totals)}

    def agree(self, finite: bool, clipped: int, device: torch.device) -> tuple[bool, int]:
        """Whether every rank found its updates finite, and the number of clipped
        updates on all ranks (one small ``all_reduce``): all ranks step or skip
        together."""
        flags = torch.tensor([0 if finite else 1, clipped], dtype=torch.int64, device=device)
        dist.all_reduce(flags)
        bad, total = flags.tolist()
        return bad == 0, total

    # ---------------------------------------------------------- checkpoints
    def checkpoint_state(
        self, optimizer: Optimizer, param_state: dict[int, dict[str, Any]]
    ) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor], dict[int, dict[str, Any]]]:
        """The layers' states, their spike-guard norms and the per-parameter
        state (``param_state``, as ``torch.optim`` packs it) for a state dict.

        Full (collective): every layer's state gathered from its owner and
        sharded per-parameter state gathered whole, the same on every rank.
        Otherwise this rank's part, with no communication: the layers it owns
        and the per-parameter state as it is (``DTensor`` shards included).
        """
        if not self.full_checkpoints:
            layers = {name: dict(state) for name, state in optimizer.layer_state.items() if self.owns(name)}
            norms = {name: value for name, value in optimizer.update_norm_avg.items() if self.owns(name)}
            return layers, norms, {index: dict(entry) for index, entry in sorted(param_state.items())}
        layers, norms = self.gather_layer_state(optimizer)
        # New dicts: the packed entries are the optimizer's own state dicts.
        full = {
            index: {key: value.full_tensor() if is_sharded(value) else value for key, value in entry.items()}
            for index, entry in sorted(param_state.items())
        }
        return layers, norms, full

    def gather_layer_state(self, optimizer: Optimizer) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
        """Every layer's whole state and spike-guard running norm, from their
        owners, on every rank (one object ``all_gather``; CPU tensors)."""
        owned = {
            name: {key: value.detach().cpu() for key, value in state.items()}
            for name, state in optimizer.layer_state.items()
            if self.owns(name)
        }
        norms = {name: value.detach().cpu() for name, value in optimizer.update_norm_avg.items() if self.owns(name)}
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, (owned, norms))
        layers, averages = {}, {}
        for owned_states, owned_norms in gathered:
            layers.update(owned_states)
            averages.update(owned_norms)
        device = local(optimizer.layers[0].weight).device
        return (
            {name: {key: value.to(device) for key, value in layers[name].items()} for name in optimizer.layer_state},
            {name: value.to(device) for name, value in averages.items()},
        )


def shard_like(value: Tensor, p: Tensor) -> Tensor:
    """This rank's ``Shard(0)`` part of the full tensor ``value``, as a ``DTensor``
    placed like the sharded parameter ``p`` (no communication)."""
    rows = shard_rows(p.shape[0], p.device_mesh.size())
    rank = p.device_mesh.get_local_rank()
    start = sum(rows[:rank])
    part = value[start:start + rows[rank]].to(device=local(p).device).clone()
    return DTensor.from_local(part, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def _all_gather(output: Tensor, chunk: Tensor) -> None:
    """All ranks' equal-sized ``chunk`` s, concatenated into ``output``."""
    # (all_gather_single replaces the deprecated all_gather_into_tensor where it exists)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, chunk)


def _common_dtype(tensors: list[Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_placement(name: str, p: Tensor, world: int) -> None:
    """Raise unless ``p`` is sharded on dim 0 over all ranks (FSDP2's layout)."""
    if not is_sharded(p):
        raise ValueError(
            f"model: layer {name!r} mixes sharded and unsharded parameters; apply fully_shard so that "
            "every parameter is a DTensor (or none is)."
        )
    if p.device_mesh.ndim != 1 or p.device_mesh.size() != world or tuple(p.placements) != (Shard(0),):
        raise ValueError(
            f"model: the parameters of layer {name!r} are placed as {tuple(p.placements)} on a mesh of shape "
            f"{tuple(p.device_mesh.shape)}; SINGD supports FSDP2 sharding on dim 0 over all {world} ranks "
            "(fully_shard on a 1-D mesh), not HSDP or tensor parallelism."
        )


def make_distributor(
    optimizer: Optimizer, distributed_work: bool | None
) -> LayerDistributor | None:
    """The optimizer's :class:`LayerDistributor`, or None for replicated work.

    Sharded (``DTensor``) parameters always need one. Replicated parameters (DDP)
    in a process group of more than one rank get one with ``distributed_work=True``,
    and by default (None) when there are at least two Kronecker layers to split:
    the factor work then falls with the ranks (measured at W = 2: 0.71–0.92× the
    replicated optimizer time, dense, hierarchical and diagonal), while one layer
    would leave the other ranks idle and add the factors' ``all_gather``.
    """
    params = [p for layer in optimizer.layers for p in layer.params]
    sharded = any(is_sharded(p) for p in params)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if sharded and distributed_work is False:
        raise ValueError(
            "distributed_work=False: the model's parameters are sharded (FSDP2), which needs distributed "
            "work; use distributed_work=None or True."
        )
    # (sharded parameters need the owners' path even on one rank: their
    # gradients are DTensors)
    replicated_split = world > 1 and (distributed_work or (distributed_work is None and len(optimizer.layers) > 1))
    if not optimizer.layers or not (sharded or replicated_split):
        return None
    costs = [optimizer._layer_cost(layer) for layer in optimizer.layers]
    shared = {layer.name: optimizer._shared_keys(layer, sharded) for layer in optimizer.layers}
    return LayerDistributor(optimizer.layers, costs, shared, sharded)


def sharded_state_dict(optimizer: Optimizer) -> dict[str, Any]:
    """This rank's part of the optimizer's state, for ``torch.distributed.checkpoint``:
    :meth:`~singd_lightning.optim.base.KroneckerOptimizer.state_dict`'s format,
    but with only the layers this rank owns (factors, momenta, spike-guard norms)
    and the sharded per-parameter state as ``DTensor`` shards. No communication
    and no full copy: ``dcp.save({..., "optim": sharded_state_dict(optimizer)})``
    on every rank writes each layer once, from its owner, and each moment's
    shards from their ranks; :func:`load_distributed_checkpoint` reads it back
    whole (into any world size). Without distributed work it is ``state_dict()``.
    """
    distributor = optimizer._distributor
    if distributor is None:
        return optimizer.state_dict()
    distributor.full_checkpoints = False
    try:
        return optimizer.state_dict()
    finally:
        distributor.full_checkpoints = True


def load_distributed_checkpoint(
    optimizer: Optimizer, checkpoint_id: str | os.PathLike, key: str = "optim"
) -> None:
    """Load ``optimizer`` from a ``torch.distributed.checkpoint`` folder that holds
    its :func:`sharded_state_dict` or its full
    :meth:`~singd_lightning.optim.base.KroneckerOptimizer.state_dict` under ``key``
    (``dcp.save({..., key: sharded_state_dict(optimizer)}, checkpoint_id=...)``).

    ``dcp.load`` fills only the entries of the state dict it is given, so a
    fresh optimizer's (no first-order moments yet, no spike-guard norms) would
    drop some of the saved state; this reads every saved entry under ``key``
    instead (the layout comes from the checkpoint's metadata), then calls
    ``optimizer.load_state_dict``, which checks it. Collective when a process
    group is initialised: every rank calls it, and each reads the whole state
    (on the CPU) before keeping its part. The checkpoint may come from any
    world size, sharded or not.

    Raises:
        ValueError: The checkpoint holds no entry ``key``, or it is not a state
            of this optimizer (see ``load_state_dict``).
    """
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner

    # The planner builds the saved layout (integer keys, lists) from the metadata
    # into the dict ``load`` hands it (a copy of the one given here).
    planner = _EmptyStateDictLoadPlanner(keys={key})
    load({}, checkpoint_id=checkpoint_id, planner=planner)
    state = planner.original_state_dict
    if key not in state:
        raise ValueError(
            f"checkpoint_id: {str(checkpoint_id)!r} holds no entry {key!r} (the key the optimizer's state was saved under)."
        )
    saved = dict(state[key])
    # (the checkpoint's paths keep the parameters' integer indices as strings)
    saved["state"] = {
        int(index) if isinstance(index, str) and index.isdigit() else index: entry
        for index, entry in saved.get("state", {}).items()
    }
    optimizer.load_state_dict(saved)


def optimizer_state_bytes(optimizer: Optimizer) -> int:
    """Bytes of optimizer state held by this rank: the layers' factors and momenta
    and the per-parameter state (a sharded state counts its local shard)."""
    total = 0
    for state in optimizer.layer_state.values():
        total += sum(t.numel() * t.element_size() for t in state.values())
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                value = local(value)
                total += value.numel() * value.element_size()
    return total


__all__ = [
    "LayerDistributor",
    "assign_owners",
    "is_sharded",
    "load_distributed_checkpoint",
    "local",
    "make_distributor",
    "optimizer_state_bytes",
    "shard_like",
    "shard_rows",
    "sharded_state_dict",
]
