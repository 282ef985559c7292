"""Machinery shared by the Kronecker-factored optimizers (SINGD and KFAC).

:class:`KroneckerOptimizer` finds the supported layers of a model, splits the
parameters into Kronecker groups and first-order fallback groups, accumulates the
curvature statistics that the :class:`~singd_lightning.optim.curvature.CurvatureCollector`
produces, reduces them across data-parallel ranks in one collective per optimizer
step, skips steps with non-finite values, and checkpoints everything as plain
tensors keyed by module names. Subclasses only say what to compute from the
statistics and how to precondition a gradient.
"""

from __future__ import annotations

import sys
import warnings
from abc import abstractmethod
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from singd_lightning.optim.curvature import (
    CurvatureCollector,
    KroneckerLayer,
    Rows,
    kronecker_modules,
    make_layer,
)
from singd_lightning.optim.checkpoint import CALLABLE_PLACEHOLDER, checked_state_dict
from singd_lightning.optim.distributed import is_sharded, local, make_distributor, shard_like
from singd_lightning.optim.fallback import FALLBACK_STEPS, momentum_step
from singd_lightning.optim.kl_clip import kl_clip_scale
from singd_lightning.optim.reductions import (
    all_finite,
    finite_and_count,
    finite_per_entry,
    inner,
    inner_rows,
    non_finite,
)
from singd_lightning.optim.hyperparameters import (
    check_grad_scaler,
    check_range,
    dtype_from_name,
    validate_kronecker_group,
)


FALLBACK_DEFAULTS = dict(
    fallback="adamw",
    fallback_lr=None,
    fallback_betas=(0.9, 0.999),
    fallback_eps=1e-8,
    fallback_weight_decay=0.0,
)

#: Default of ``update_clip``: a layer's preconditioned update may be at most this
#: many times the running RMS of its recent norms. A loss spike multiplies it by
#: 10²–10¹⁸; in ordinary training it stayed below 14 on the workloads measured
#: (README, "Guarantees").
UPDATE_CLIP = 30.0
#: Decay of the running mean of a layer's squared update norm (~20 steps).
UPDATE_NORM_DECAY = 0.95


def _is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is a ``torch.compile`` wrapper (looked up only if compile
    was ever used: importing the compiler costs seconds)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return eval_frame is not None and isinstance(model, eval_frame.OptimizedModule)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The inner module of (nested) ``DataParallel``/``DistributedDataParallel`` and
    ``torch.compile`` wrappers, so that layer names (and checkpoint keys) are those
    of the plain model."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif _is_compiled(model):
            model = model._orig_mod
        else:
            return model


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _own(t: Tensor) -> Tensor:
    """``t``, or a copy of it if it is part of a larger storage (a row of a batch's
    stacked state, also after a round trip through pickle)."""
    return t.clone() if t.untyped_storage().nbytes() > t.numel() * t.element_size() else t


def _weighted_copy(t: Tensor, dtype: torch.dtype, weight: float) -> Tensor:
    """``weight · t`` as a new tensor of ``dtype`` (one pass when ``weight`` is 1)."""
    out = t.to(dtype, copy=True)
    return out if weight == 1.0 else out.mul_(weight)


class KroneckerOptimizer(Optimizer):
    """Base class: layers, groups, fallback, statistics, skipping, checkpoints.

    Args:
        model: The model (a ``DataParallel``/``DistributedDataParallel`` wrapper is
            unwrapped). Its ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Embedding`` layers are preconditioned.
        params: None (all trainable parameters of ``model``), an iterable of
            parameters, or parameter groups (dicts) with their own hyper-parameters.
            A layer's preconditioner follows its weight's group; every parameter
            steps with its own group's ``lr``, ``momentum`` and ``weight_decay``: a
            bias in another group (timm's no-decay group) is still preconditioned
            with its weight.
        defaults: The subclass's hyper-parameters (validated per group).
        fallback: First-order method for parameters outside supported layers:
            ``"adamw"``, ``"sgd"`` or ``"none"`` (left frozen, with a warning).
        fallback_lr: The fallback's learning rate; None uses the group's ``lr``.
        fallback_betas: AdamW's ``(β1, β2)``.
        fallback_eps: AdamW's ε.
        fallback_weight_decay: The fallback's weight decay (decoupled for AdamW);
            None: each group's ``weight_decay``, as the authors' wrappers gave their
            AdamW/SGD for the other parameters (f-dangel/singd before b5db71a,
            ``sparse_ngd/experimental/my_sngd_helpers.py``). A group that sets
            ``weight_decay`` but not ``fallback_weight_decay`` uses its
            ``weight_decay`` for its fallback parameters.
        weight_decay_start: The Kronecker parameters get no weight decay before
            this step (an integer ≥ 0), or before step ``20·T`` (``"auto"``), as
            the authors' wrappers did (``my_sngd_helpers.py``, ``kfac_helpers.py``:
            weight decay 0 while ``steps < 20·T``); the fallback's weight decay is
            not delayed (theirs was not).
        update_clip: Spike guard: a layer's preconditioned update whose norm is
            more than ``update_clip`` times the running RMS of its recent norms is
            an outlier and is scaled down to that running RMS (None: never, the
            paper's update).
        kl_clip: KL clip κ (as KFAC implementations use): every preconditioned
            update of the layers that share this value is scaled by
            ``ν = min(1, sqrt(κ / |Σ_l lr_l² ⟨u_l, g_l⟩|))``, so the step's
            second-order KL divergence stays below κ however the preconditioner
            grows; None: off (the paper's update). No host synchronisation.
        grad_scaler: A ``torch.amp.GradScaler`` used with this optimizer, so that
            the curvature statistics are un-scaled exactly (see
            :meth:`attach_grad_scaler`).
        init_grad_scale: The loss scale expected in the first backward pass when
            a scaler is attached later (only affects numerical range, not values).
        distributed_work: Split the factor work across the ranks of the default
            process group (see :mod:`~singd_lightning.optim.distributed`): each
            layer's factors are updated (and its private state kept) by one owner
            rank, the factors the other ranks need are shared in one collective
            per update step. None: where the parameters are sharded (FSDP2's
            ``fully_shard``, which requires it), and with replicated parameters
            (DDP) on two or more ranks when there are at least two Kronecker
            layers to split (faster: see :func:`~singd_lightning.optim.distributed.make_distributor`);
            True: also with a single Kronecker layer; False: every rank does all
            the work (not possible with sharded parameters). With distributed
            work, :meth:`state_dict` is collective (every rank calls it).
    """

    #: Layer-state keys that the curvature hooks read: every rank keeps them.
    statistics_keys: tuple[str, ...] = ()
    #: Layer-state keys that :meth:`_precondition` reads: every rank keeps them
    #: when the gradients are replicated (DDP) and the work is distributed.
    precondition_keys: tuple[str, ...] = ()

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[nn.Parameter] | Iterable[dict] | None,
        defaults: dict[str, Any],
        *,
        fallback: str = "adamw",
        fallback_lr: float | None = None,
        fallback_betas: tuple[float, float] = (0.9, 0.999),
        fallback_eps: float = 1e-8,
        fallback_weight_decay: float | None = 0.0,
        weight_decay_start: int | str = 0,
        update_clip: float | None = UPDATE_CLIP,
        kl_clip: float | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        init_grad_scale: float = 1.0,
        distributed_work: bool | None = None,
    ) -> None:
        if distributed_work is not None and not isinstance(distributed_work, bool):
            raise ValueError(f"distributed_work must be None, True or False, got {distributed_work!r}.")
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        model = unwrap_model(model)
        check_range("init_grad_scale", init_grad_scale, 0.0, low_inclusive=False)
        check_grad_scaler(grad_scaler)
        defaults = dict(defaults)
        defaults.update(
            fallback=fallback,
            fallback_lr=fallback_lr,
            fallback_betas=fallback_betas,
            fallback_eps=fallback_eps,
            fallback_weight_decay=fallback_weight_decay,
            weight_decay_start=weight_decay_start,
            update_clip=update_clip,
            kl_clip=kl_clip,
            role="kronecker",
        )
        validate_kronecker_group(defaults)
        self._validate_group(defaults)
        groups, frozen = self._split_groups(model, params, defaults)
        if frozen:
            warnings.warn(
                "fallback='none': these parameters are outside the preconditioned "
                f"layers and will NOT be trained: {', '.join(frozen)}.",
                stacklevel=3,
            )
        if not groups:
            raise ValueError("params: found no parameter to optimize.")
        super().__init__(groups, defaults)

        self.steps = 0  # optimizer steps taken (skipped steps excluded)
        self.skipped_steps = 0
        self.rejected_preconditioner_updates = 0
        # Spike guard: layer updates scaled down by ``update_clip``, factor
        # updates bounded by the subclass (SINGD's ``max_factor_step``).
        self.clipped_updates = 0
        self.clipped_factor_updates = 0
        # Per layer: running mean of the squared norm of its preconditioned update.
        self.update_norm_avg: dict[str, Tensor] = {}
        # Per layer, numbers describing the latest accepted preconditioner update
        # (only with ``track_diagnostics``: they cost extra products).
        self.track_diagnostics = False
        self.last_diagnostics: dict[str, dict[str, Tensor]] = {}
        self.grad_scaler = None
        self._scale_hint = float(init_grad_scale)
        self.layers = self._find_layers(model)
        self.layer_state: dict[str, dict[str, Tensor]] = {}
        for layer in self.layers:
            self.layer_state[layer.name] = self._init_layer_state(layer)
        self._distributor = make_distributor(self, distributed_work)
        if self._distributor is not None:  # the owners keep the private state
            for name, state in self.layer_state.items():
                self.layer_state[name] = self._distributor.private_keys_dropped(name, state)
        # Per layer: [Σ stat(Aᵀ), Σ stat(Gᵀ)/s², Σn, ΣN] since the last step.
        self._stats: dict[str, list] = {}
        self.collector = CurvatureCollector(
            self.layers,
            sink=self._accumulate,
            is_collecting=lambda layer: self.steps % layer.group["T"] == 0,
            dtypes=self.preconditioner_dtypes,
            grad_scale=lambda: self._scale_hint,
        )
        if grad_scaler is not None:
            self.attach_grad_scaler(grad_scaler)

    # ---------------------------------------------------------------- setup
    def _validate_group(self, group: dict) -> None:
        """Subclass hook: check (and normalise) method-specific hyper-parameters."""

    def _split_groups(
        self, model: nn.Module, params, defaults: dict
    ) -> tuple[list[dict], list[str]]:
        """Split each user group into a Kronecker group and a fallback group.

        A ``nn.Linear``/``nn.Conv2d`` bias is preconditioned with its weight (as the
        last column of the augmented weight) whenever that weight is optimized,
        whichever group the bias is in: it joins the Kronecker group of its own
        group, so that its own ``lr``, ``momentum`` and ``weight_decay`` apply to its
        part of the layer's update (timm's groups put biases in a no-decay group).
        A group's fallback parameters use its ``fallback_weight_decay`` if the group
        sets it, else its ``weight_decay`` if the group sets it, else the
        optimizer's ``fallback_weight_decay``; a ``fallback_weight_decay`` of None
        means the group's ``weight_decay``.
        """
        names = {id(p): n for n, p in model.named_parameters()}
        weight_of_bias: dict[int, int] = {}
        weights: set[int] = set()
        modules, left_out = kronecker_modules(model)
        for _, module in modules:
            weights.add(id(module.weight))
            if getattr(module, "bias", None) is not None:
                weight_of_bias[id(module.bias)] = id(module.weight)
        sparse = {id(m.weight): name for name, m in model.named_modules() if isinstance(m, nn.Embedding) and m.sparse}
        if params is None:
            user_groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
        else:
            params = list(params)
            if params and isinstance(params[0], dict):
                user_groups = [dict(g) for g in params]
            else:
                user_groups = [{"params": params}]
        valid_keys = set(defaults) - {"role"}
        model_params = set(names)
        # Validate every group before splitting any: where a bias goes depends on
        # whether its weight is in some group.
        checked = []
        for index, user_group in enumerate(user_groups):
            if "params" not in user_group:
                raise ValueError(f"params: parameter group {index} has no 'params' entry.")
            unknown = sorted(set(user_group) - valid_keys - {"params"})
            if unknown:
                raise ValueError(
                    f"params: parameter group {index} has unknown options {unknown}; "
                    f"valid options are {sorted(valid_keys)}."
                )
            group_params = user_group["params"]
            group_params = [group_params] if isinstance(group_params, Tensor) else list(group_params)
            foreign = [p for p in group_params if not isinstance(p, Tensor) or id(p) not in model_params]
            if foreign:
                raise ValueError(
                    f"params: {len(foreign)} entries of parameter group {index} are not parameters of "
                    "model (pass the model these parameters belong to)."
                )
            merged = {**defaults, **{k: v for k, v in user_group.items() if k != "params"}}
            validate_kronecker_group(merged)
            self._validate_group(merged)
            checked.append((user_group, group_params, merged))
        optimized = {id(p) for _, group_params, _ in checked for p in group_params}
        sparse_names = [name for key, name in sparse.items() if key in optimized]
        if sparse_names:
            raise ValueError(
                f"model: the nn.Embedding {', '.join(sparse_names)} has sparse=True: sparse gradients fit neither "
                "the Kronecker update nor the first-order fallback; use sparse=False."
            )
        modules_by_name = dict(model.named_modules())
        left_out = {name: why for name, why in left_out.items() if id(modules_by_name[name].weight) in optimized}
        if left_out:
            warnings.warn(
                "Not preconditioned, trained by the first-order fallback: "
                + "; ".join(f"{name} ({reason})" for name, reason in left_out.items()) + ".",
                stacklevel=4,
            )
        groups, frozen = [], []
        for user_group, group_params, merged in checked:
            kronecker, other = [], []
            for p in group_params:
                if id(p) in weights or weight_of_bias.get(id(p)) in optimized:
                    kronecker.append(p)
                else:
                    other.append(p)
            if kronecker:
                groups.append({**merged, "params": kronecker, "role": "kronecker"})
            if other and merged["fallback"] == "none":
                frozen += [names.get(id(p), f"<unnamed {tuple(p.shape)}>") for p in other]
            elif other:
                fallback_group = {**merged, "params": other, "role": "fallback"}
                if merged["fallback_lr"] is not None:
                    fallback_group["lr"] = merged["fallback_lr"]
                # The group's own settings apply to its fallback parameters.
                own = "fallback_weight_decay" in user_group or "weight_decay" not in user_group
                if own and merged["fallback_weight_decay"] is not None:
                    fallback_group["weight_decay"] = merged["fallback_weight_decay"]
                groups.append(fallback_group)
        return groups, frozen

    def _find_layers(self, model: nn.Module) -> list[KroneckerLayer]:
        """The supported layers whose weight is optimized; a layer belongs to its
        weight's group (preconditioner and spike guard settings)."""
        in_group = {
            id(p): index
            for index, group in enumerate(self.param_groups)
            if group["role"] == "kronecker"
            for p in group["params"]
        }
        layers = []
        for name, module in kronecker_modules(model)[0]:
            if id(module.weight) in in_group:
                index = in_group[id(module.weight)]
                has_bias = getattr(module, "bias", None) is not None and id(module.bias) in in_group
                layers.append(make_layer(name, module, self.param_groups[index], has_bias, index))
        return layers

    def _shared_keys(self, layer: KroneckerLayer, sharded: bool) -> tuple[str, ...]:
        """The layer-state keys every rank keeps under distributed work: those the
        hooks read, and with replicated gradients those :meth:`_precondition` reads."""
        keys = self.statistics_keys if sharded else self.statistics_keys + self.precondition_keys
        return tuple(dict.fromkeys(keys))

    def _layer_cost(self, layer: KroneckerLayer) -> float:
        """The relative cost of ``layer``'s factor update, to balance the owners of
        distributed work: that of dense factors, ``d_K³ + d_o³``."""
        return float(layer.dim_in**3 + layer.dim_out**3)

    def preconditioner_dtypes(self, layer: KroneckerLayer) -> tuple[torch.dtype, torch.dtype]:
        """The (K, C) factor dtypes of ``layer`` (default: the weight's dtype)."""
        dtype_k, dtype_c = layer.group["preconditioner_dtype"]
        default = layer.weight.dtype
        return dtype_from_name(dtype_k, default), dtype_from_name(dtype_c, default)

    def attach_grad_scaler(self, grad_scaler: torch.amp.GradScaler | None) -> None:
        """Use ``grad_scaler``'s loss scale to un-scale the curvature statistics.

        Use the scaler as usual (``scaler.scale(loss).backward()``,
        ``scaler.step(optimizer)``, ``scaler.update()``): it un-scales the
        gradients and skips steps with infs; the optimizer un-scales its
        statistics by the same scale.
        """
        self.grad_scaler = grad_scaler
        if grad_scaler is not None and grad_scaler.is_enabled():
            self._scale_hint = float(grad_scaler.get_scale())

    def _current_grad_scale(self) -> float:
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return 1.0
        return float(scaler.get_scale())

    # ------------------------------------------------------------ subclass API
    @abstractmethod
    def _init_layer_state(self, layer: KroneckerLayer) -> dict[str, Tensor]:
        """The initial factors of ``layer``."""

    @abstractmethod
    def _statistics(self, layer: KroneckerLayer, x_in: Rows, x_out: Rows) -> tuple[Tensor, Tensor]:
        """What to accumulate from one pass: flat tensors from the lazily built
        ``Aᵀ`` and ``Gᵀ`` (see :class:`~singd_lightning.optim.curvature.Rows`)."""

    @abstractmethod
    def _update_preconditioner(self, layer: KroneckerLayer, stat_in: Tensor, stat_out: Tensor) -> dict[str, Tensor] | None:
        """New layer state from the reduced statistics (``H_K``, ``H_C`` and their
        dense analogues), or None to keep the current one. Must not modify state;
        may modify the statistics (they are this update's own)."""

    @abstractmethod
    def _precondition(self, layer: KroneckerLayer, grad: Tensor) -> Tensor:
        """The preconditioned ``(d_o, d_K)`` gradient, in the gradient's dtype."""

    # ------------------------------------------------------------ statistics
    def _accumulate(
        self, layer: KroneckerLayer, x_in: Rows, x_out: Rows, w_in: float, w_out: float, n: int, num_terms: int
    ) -> None:
        stat_in, stat_out = self._statistics(layer, x_in, x_out)
        acc_dtype = torch.float64 if torch.float64 in (stat_in.dtype, stat_out.dtype) else torch.float32
        entry = self._stats.get(layer.name)
        # Accumulate in (at least) float32: sums over many passes would overflow fp16.
        if entry is None:  # the first pass: own copies, weighted
            entry = self._stats[layer.name] = [
                _weighted_copy(stat_in, acc_dtype, w_in),
                _weighted_copy(stat_out, acc_dtype, w_out),
                0,
                0,
            ]
        else:
            entry[0].add_(stat_in, alpha=w_in)
            entry[1].add_(stat_out, alpha=w_out)
        entry[2] += n
        # A summed loss (loss_average=None) has no number of terms to restore.
        entry[3] += num_terms if layer.group["loss_average"] is not None else 0

    def _clear_statistics(self) -> None:
        self._stats.clear()

    def _reduced_statistics(self, layers: list[KroneckerLayer]) -> dict[str, tuple[Tensor, Tensor]] | None:
        """``(H_in, H_out)`` per layer with statistics, summed over all passes and
        ranks, normalised as one pass over the joint batch would be (SPEC §1);
        None if the sums over ranks are not finite (every rank finds the same)."""
        world = _world_size()
        if world > 1:
            entries = self._all_reduce(layers)
            if entries is None:
                return None
        else:
            entries = {layer.name: self._stats[layer.name] for layer in layers if layer.name in self._stats}
        scale = self._current_grad_scale()
        # The hooks un-scaled by the scale hint; the remaining factor (and the
        # data-parallel 1/W of the averaged gradient) goes here. The next
        # collecting step's hooks divide by this scale.
        out_factor = (self._scale_hint / scale) ** 2 / world**2
        self._scale_hint = scale
        reduced = {}
        for layer in layers:
            entry = entries.get(layer.name)
            if entry is None or entry[2] == 0:
                continue
            acc_in, acc_out, n, num_terms = entry
            dtype_k, dtype_c = self.preconditioner_dtypes(layer)
            # The accumulators are dropped after this step: normalised in place.
            h_in = acc_in.div_(n).to(dtype_k)
            h_out = acc_out.mul_(max(num_terms, 1) * out_factor).to(dtype_c)
            reduced[layer.name] = (h_in, h_out)
        return reduced

    def _all_reduce(self, layers: list[KroneckerLayer]) -> dict[str, list] | None:
        """Sum the statistics of all ``layers`` over ranks in one flat collective.

        The collective runs in the accumulators' dtype (float32 unless a
        preconditioner is float64), not in float64: float64 halves the bandwidth
        and is slow on GPUs. The error this adds is bounded: the ``W`` ranks'
        values of an entry are summed with ``W − 1`` roundings, so
        ``|ŝ − s| ≤ (W − 1)·2⁻²⁴·Σ_r |x_r|`` (< 6.2e-5·Σ|x_r| for ``W ≤ 1024``), the
        same bound as each rank's own float32 sum over its batch, which has at
        least as many terms. The counts travel in the same buffer (exact up to
        2²⁴, then rounded as the float32 divisor they become); all of them are
        read back with one host synchronisation, not one per layer, together
        with whether the sums are finite (None if not): the same on every rank,
        so that all ranks skip such a step together.
        """
        accumulators = [t for layer in layers for t in self._stats.get(layer.name, [])[:2]]
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in accumulators) else torch.float32
        device = layers[0].weight.device
        pieces, sizes, counts = [], [], []
        for layer in layers:
            entry = self._stats.get(layer.name)
            numel_in, numel_out = self._statistics_numel(layer)
            if entry is None:
                pieces.append(torch.zeros(numel_in + numel_out, device=device, dtype=dtype))
                counts += [0, 0]
            else:
                pieces += [entry[0].to(dtype).flatten(), entry[1].to(dtype).flatten()]
                counts += [entry[2], entry[3]]
            sizes.append((numel_in, numel_out))
        pieces.append(torch.tensor(counts, dtype=dtype, device=device))
        flat = torch.cat(pieces)
        dist.all_reduce(flat)
        *totals, finite = torch.cat([flat[-len(counts):], all_finite(flat).to(dtype).reshape(1)]).tolist()
        if not finite:
            return None
        out, offset = {}, 0
        for i, (layer, (numel_in, numel_out)) in enumerate(zip(layers, sizes)):
            acc_in = flat[offset:offset + numel_in]
            acc_out = flat[offset + numel_in:offset + numel_in + numel_out]
            offset += numel_in + numel_out
            out[layer.name] = [acc_in, acc_out, totals[2 * i], totals[2 * i + 1]]
        return out

    @abstractmethod
    def _statistics_numel(self, layer: KroneckerLayer) -> tuple[int, int]:
        """Sizes of the two accumulated statistics of ``layer``."""

    # ------------------------------------------------------------------ step
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients and drop statistics of a step that was not taken
        (e.g. one a loss scaler skipped because of infs)."""
        super().zero_grad(set_to_none=set_to_none)
        self._clear_statistics()

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Update the preconditioner (every ``T`` steps) and the parameters.

        Nothing non-finite is ever written: the statistics are checked before the
        factors are updated, each layer's new factors before they are accepted,
        and every update (preconditioned or first-order gradient) before any
        parameter changes. A step with a non-finite update is skipped whole
        (factors, momenta, counters as before) with a warning, and counted in
        ``skipped_steps``.

        Args:
            closure: Re-evaluates the model and returns the loss; called with
                gradients enabled (as Lightning's automatic optimisation does).

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with_grad = [
            [p for p in group["params"] if p.grad is not None] for group in self.param_groups
        ]
        if not any(with_grad):
            # Nothing to update (no backward pass since zero_grad): not a step,
            # so the T schedule does not move.
            self._clear_statistics()
            warnings.warn("step() found no gradients (was backward() called?): nothing was updated.", stacklevel=2)
            return loss

        due = [layer for layer in self.layers if self.steps % layer.group["T"] == 0]
        stats = [t for entry in self._stats.values() for t in entry[:2]]
        # Across ranks, the sums are checked after the reduction (all ranks agree).
        if due and stats and _world_size() == 1 and non_finite(stats):
            return self._skip(loss, "curvature statistics")
        # Only a factor update has something to undo if the step is found invalid.
        saved = self._snapshot() if due else None
        if due and not self._update_preconditioners(due):
            self._restore(saved)
            return self._skip(loss, "curvature statistics")

        # Every update is computed and checked before any parameter changes.
        plans, pending_avg, clip_flags, checked = [], {}, [], []
        kronecker_ids = {
            id(p) for group, params in zip(self.param_groups, with_grad) if group["role"] == "kronecker" for p in params
        }
        natural = self._kronecker_updates(kronecker_ids, pending_avg, clip_flags)
        for group, params in zip(self.param_groups, with_grad):
            if not params:
                continue
            if group["role"] == "kronecker":
                # Each parameter's part of its layer's update, with its own group's
                # lr, momentum and weight decay (a bias may be in another group).
                targets = [p for p in params if id(p) in natural]
                updates = [natural[id(p)] for p in targets]
                plans.append((group, targets, updates))
                checked += updates
            else:
                plans.append((group, params, None))
                checked += [p.grad for p in params]
        finite, clipped = finite_and_count([local(t) for t in checked], clip_flags)
        if self._distributor is not None and self._distributor.sharded:
            finite, clipped = self._distributor.agree(finite, clipped, local(self.layers[0].weight).device)
        if not finite:
            if saved is not None:
                self._restore(saved)
            return self._skip(loss, "updates")
        if clipped:
            self.clipped_updates += clipped
            warnings.warn(
                "A layer's update was more than update_clip times its running norm (a loss "
                "spike?): scaled down to that norm; see clipped_updates.",
                stacklevel=2,
            )
        self.update_norm_avg.update(pending_avg)
        for group, targets, updates in plans:
            if updates is None:
                FALLBACK_STEPS[group["fallback"]](targets, self.state, group)
            elif targets:
                momentum_step(targets, updates, self.state, group["lr"], group["momentum"], self._weight_decay(group))
        self._clear_statistics()
        self.steps += 1
        return loss

    def _weight_decay(self, group: dict) -> float:
        """A Kronecker group's weight decay at this step: 0 before ``weight_decay_start``."""
        start = group["weight_decay_start"]
        if start == "auto":
            start = 20 * group["T"]
        return group["weight_decay"] if self.steps >= start else 0.0

    def _skip(self, loss: Tensor | None, what: str) -> Tensor | None:
        """Skip this step: drop its statistics, count it, warn."""
        self._clear_statistics()
        self.skipped_steps += 1
        warnings.warn(f"Non-finite gradients or {what}: step skipped, nothing changed.", stacklevel=3)
        return loss

    def _snapshot(self) -> tuple:
        """What a factor update replaces (references, no copies: updates build new
        tensors), so that a step found invalid later can be undone."""
        return (
            {name: dict(state) for name, state in self.layer_state.items()},
            self._scale_hint,
            self.last_diagnostics,
            self.rejected_preconditioner_updates,
            self.clipped_factor_updates,
        )

    def _restore(self, saved: tuple) -> None:
        layer_state, self._scale_hint, self.last_diagnostics, rejected, clipped = saved
        self.rejected_preconditioner_updates = rejected
        self.clipped_factor_updates = clipped
        for name, state in layer_state.items():
            self.layer_state[name] = state

    def _new_layer_states(
        self, layers: list[KroneckerLayer], reduced: dict[str, tuple[Tensor, Tensor]]
    ) -> tuple[list[tuple[KroneckerLayer, dict[str, Tensor]]], int]:
        """The proposed new state of each layer with statistics, and how many
        factor updates a guard bounded. Subclasses may work across layers."""
        updates = []
        for layer in layers:
            if layer.name in reduced:
                new_state = self._update_preconditioner(layer, *reduced[layer.name])
                if new_state is not None:
                    updates.append((layer, new_state))
        return updates, 0

    def _update_preconditioners(self, layers: list[KroneckerLayer]) -> bool:
        """Update the factors of ``layers`` from their statistics; False (nothing
        changed) if the statistics summed over ranks are not finite."""
        reduced = self._reduced_statistics(layers)
        if reduced is None:
            return False
        distributor = self._distributor
        shared = list(reduced)
        if distributor is not None:  # each rank updates the layers it owns
            reduced = {name: value for name, value in reduced.items() if distributor.owns(name)}
        updates, clipped = self._new_layer_states(layers, reduced)
        rejected = 0
        diagnostics = {}
        if updates:
            # One synchronisation decides which updates are valid; invalid ones
            # (overflow in low precision) leave that layer's state untouched.
            finite = finite_per_entry([list(new_state.values()) for _, new_state in updates]).tolist()
            for (layer, new_state), ok in zip(updates, finite):
                state = self.layer_state[layer.name]
                if not ok:
                    rejected += 1
                    continue
                if self.track_diagnostics:
                    diagnostics[layer.name] = self._layer_diagnostics(layer, state, new_state)
                # A new dict: the snapshot of this step keeps the old one intact.
                self.layer_state[layer.name] = {**state, **new_state}
        if distributor is not None and shared:
            rejected, clipped = distributor.share_factors(self, shared, [rejected, clipped])
        self.rejected_preconditioner_updates += rejected
        if clipped:
            self.clipped_factor_updates += clipped
            warnings.warn(
                "A factor update exceeded max_factor_step (a loss spike, or statistics that vary "
                "much from batch to batch, as with small batches): its step was scaled down to "
                "that bound; see clipped_factor_updates.",
                stacklevel=4,
            )
        self.last_diagnostics = diagnostics
        return True

    def _layer_diagnostics(self, layer: KroneckerLayer, old: dict[str, Tensor], new: dict[str, Tensor]) -> dict[str, Tensor]:
        """Cheap per-layer numbers of an accepted preconditioner update (0-dim
        tensors, read only when logged): by default the norm of each factor's change."""
        return {
            f"update_norm_{key}": (new[key].float() - old[key].float()).norm()
            for key in new
            if key in old and new[key].is_floating_point() and not key.startswith("m_")
        }

    def _kronecker_updates(
        self, with_grad: set[int], pending_avg: dict[str, Tensor], clip_flags: list[Tensor]
    ) -> dict[int, Tensor]:
        """The preconditioned update of every Kronecker parameter whose id is in
        ``with_grad``, by id (spike guard applied), without changing any state: the
        guard's new running norms go to ``pending_avg`` and its "clipped" flags to
        ``clip_flags``. A layer's update uses its weight's group (preconditioner,
        ``update_clip``)."""
        if self._distributor is not None and self._distributor.sharded:
            # The owners precondition the gathered gradients (FSDP2).
            return self._distributor.sharded_updates(self, with_grad, pending_avg, clip_flags)
        updates: dict[int, Tensor] = {}
        # Per kl_clip value: the layers' ⟨update, gradient⟩ terms and their updates.
        kl_terms: dict[float, tuple[list[Tensor], list[Tensor]]] = {}
        due = [layer for layer in self.layers if any(id(p) in with_grad for p in layer.params)]
        for layers, grads, naturals in self._preconditioned(due):
            group = layers[0].group  # (a batch's layers share their weights' group)
            naturals = self._guarded_updates(layers, naturals, pending_avg, clip_flags)
            parts = []
            for layer, natural in zip(layers, naturals.unbind()):
                for p, d in zip(layer.params, layer.split(natural)):
                    if id(p) in with_grad:
                        updates[id(p)] = d
                        parts.append(d)
            if group["kl_clip"] is not None:
                terms, scaled = kl_terms.setdefault(group["kl_clip"], ([], []))
                terms.append(self._kl_term(layers, naturals, grads))
                # One scaling of the batch where the updates are its views (split
                # gives views), else each update.
                storage = naturals.untyped_storage().data_ptr()
                views = all(d.untyped_storage().data_ptr() == storage for d in parts)
                scaled += [naturals] if views else parts
        for kl_clip, (terms, scaled) in kl_terms.items():
            scale = kl_clip_scale(kl_clip, terms)
            for d in scaled:
                d.mul_(scale.to(d.dtype))
        return updates

    def _preconditioned(
        self, layers: list[KroneckerLayer], gradients: dict[str, Tensor] | None = None
    ) -> Iterator[tuple[list, Tensor, Tensor]]:
        """``(layers, gradients, preconditioned gradients)`` for all of ``layers``, in
        batches: ``(L, d_o, d_K)`` tensors for a batch of ``L`` layers of the same
        shapes and parameter group, which subclasses may compute together (SINGD
        batches layers of the same factor shapes, ``batch_layers``). By default one
        layer at a time (``L = 1``), so that only one layer's gradient matrix (a
        copy, with a bias) is held at once. The gradient matrices are the layers'
        own (:meth:`KroneckerLayer.gradient_matrix`: a missing weight or bias
        gradient counts as zero) or, by layer name, ``gradients`` (the full ones
        an owner gathers under FSDP2)."""
        for layer in layers:
            grad = layer.gradient_matrix() if gradients is None else gradients[layer.name]
            yield [layer], grad.unsqueeze(0), self._precondition(layer, grad).unsqueeze(0)

    def _guarded_updates(
        self, layers: list[KroneckerLayer], naturals: Tensor, pending_avg: dict[str, Tensor], clip_flags: list[Tensor]
    ) -> Tensor:
        """The spike guard of :meth:`_clip_update` on a batch of ``L`` layers of one
        parameter group, their preconditioned gradients stacked (``(L, d_o, d_K)``):
        a few operations for the batch instead of a dozen per layer. One layer, or
        a batch some of whose layers have no running norm yet, goes layer by layer."""
        clip = layers[0].group["update_clip"]
        if clip is None:
            return naturals
        averages = [self.update_norm_avg.get(layer.name) for layer in layers]
        if len(layers) == 1 or any(avg is None for avg in averages):
            for layer, natural in zip(layers, naturals.unbind()):
                self._clip_update(layer, natural, clip, pending_avg, clip_flags)  # (in place)
            return naturals
        norm_sq = inner_rows(naturals, naturals).float()
        avg = torch.stack(averages).to(norm_sq.device)
        over = (norm_sq > avg * clip**2) & (avg > 0)
        scale = torch.where(over, (avg / norm_sq).sqrt(), torch.ones_like(norm_sq))
        naturals.mul_(scale.to(naturals.dtype).view(-1, *(1,) * (naturals.ndim - 1)))
        kept = torch.where(over | ~torch.isfinite(norm_sq), avg, norm_sq)
        new_avg = avg * UPDATE_NORM_DECAY + kept * (1.0 - UPDATE_NORM_DECAY)
        for layer, value in zip(layers, new_avg.unbind()):
            pending_avg[layer.name] = value
        clip_flags.append(over)
        return naturals

    @staticmethod
    def _kl_term(layers: list[KroneckerLayer], naturals: Tensor, grads: Tensor) -> Tensor:
        """``lr² Σ_l ⟨u_l, g_l⟩`` of a batch's updates ``u_l`` and gradients ``g_l``
        (``(L, d_o, d_K)``, one parameter group; see :func:`kl_clip_scale`)."""
        if len(layers) == 1:
            return inner(naturals[0], grads[0]) * layers[0].group["lr"] ** 2
        return inner_rows(naturals, grads).sum() * layers[0].group["lr"] ** 2

    def _clip_update(
        self, layer: KroneckerLayer, natural: Tensor, clip: float, pending_avg: dict[str, Tensor], clip_flags: list[Tensor]
    ) -> Tensor:
        """Scale ``natural`` down to the running RMS of the layer's update norms if
        it is more than ``clip`` times that (exactly unchanged otherwise); no host
        sync."""
        norm_sq = inner(natural, natural).float()
        avg = self.update_norm_avg.get(layer.name)
        if avg is None:  # first update: nothing to compare to
            # (an overflowing norm must not disable the guard: it counts as 0)
            pending_avg[layer.name] = torch.where(torch.isfinite(norm_sq), norm_sq, torch.zeros_like(norm_sq))
            return natural
        # An inf norm of finite entries (overflow in the square) is a spike too;
        # a NaN norm is not compared (the finiteness check rejects the step).
        over = (norm_sq > avg * clip**2) & (avg > 0)
        # A spike is an outlier, not a trend: its update is scaled to the running
        # RMS (a typical step), not to the detection bound, which would still be
        # ``clip`` typical steps, carried on by the momentum.
        scale = torch.where(over, (avg / norm_sq).sqrt(), torch.ones_like(norm_sq))
        natural.mul_(scale.to(natural.dtype))
        kept = torch.where(over | ~torch.isfinite(norm_sq), avg, norm_sq)
        pending_avg[layer.name] = avg * UPDATE_NORM_DECAY + kept * (1.0 - UPDATE_NORM_DECAY)
        clip_flags.append(over)
        return natural

    # ---------------------------------------------------------- checkpoints
    @abstractmethod
    def _layer_layout(self, layer: KroneckerLayer) -> dict[str, Any]:
        """What the layer's state means (method, structures, dimensions): plain
        Python values, saved with the state and checked at load."""

    @abstractmethod
    def _layer_tensor_shapes(self, layer: KroneckerLayer) -> tuple[dict[str, tuple], dict[str, tuple]]:
        """``(required, optional)``: the shapes of the layer's state tensors by key."""

    def state_dict(self) -> dict[str, Any]:
        """PyTorch's optimizer state plus the factors, keyed by module names.

        Holds only tensors, Python scalars and strings, so it loads with
        ``torch.load(..., weights_only=True)``. Each layer's layout (method,
        structures, dimensions) is stored with its factors and checked at load.
        Schedules (callables) in parameter groups are stored as a placeholder and
        kept from the loading optimizer.

        With distributed work (FSDP2, or ``distributed_work=True``) it is the *full*
        state dict, the same on every rank and in the same format as without
        distribution (so it loads into a sharded or an unsharded optimizer, of
        any world size): every rank must call it, since the layers' private
        state is gathered from their owners and sharded per-parameter state
        (``DTensor`` s) is gathered whole. It holds plain tensors only, so
        ``torch.distributed.checkpoint`` saves it as it is (one copy; or save
        each rank's part, :func:`~singd_lightning.optim.distributed.sharded_state_dict`);
        read it back with :func:`~singd_lightning.optim.distributed.load_distributed_checkpoint`.
        ``get_optimizer_state_dict`` keeps only ``torch.optim``'s per-parameter
        layout and would drop the factors.
        """
        state = super().state_dict()
        for group in state["param_groups"]:
            for key, value in group.items():
                if callable(value):
                    group[key] = CALLABLE_PLACEHOLDER
        layers = {name: dict(layer_state) for name, layer_state in self.layer_state.items()}
        norms = dict(self.update_norm_avg)
        if self._distributor is not None:
            layers, norms, state["state"] = self._distributor.checkpoint_state(self, state["state"])
        # A batch's factor update and spike guard leave each layer views of one
        # tensor (rows): the state dict holds each layer's own.
        layers = {name: {key: _own(value) for key, value in layer_state.items()} for name, layer_state in layers.items()}
        norms = {name: _own(value) for name, value in norms.items()}
        state["kronecker"] = {
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "clipped_updates": self.clipped_updates,
            "clipped_factor_updates": self.clipped_factor_updates,
            "grad_scale_hint": self._scale_hint,
            "layers": layers,
            "layouts": {layer.name: self._layer_layout(layer) for layer in self.layers},
            "update_norm_avg": norms,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from :meth:`state_dict`, after checking all of it.

        Raises:
            TypeError, ValueError: The state is not this optimizer's (another
                method, structure, layer width or set of layers), is malformed, or
                holds non-finite or out-of-range values. The message names the
                entry; nothing has changed when it is raised.
        """
        state_dict, kronecker = checked_state_dict(self, state_dict)
        callables = [{k: v for k, v in g.items() if callable(v)} for g in self.param_groups]
        # PyTorch casts saved state to the parameter dtype; the fallback keeps the
        # moments of half-precision parameters in float32, so restore those as saved.
        params = [p for g in self.param_groups for p in g["params"]]
        float32_moments = {
            index: {k: v for k, v in saved.items() if k in ("exp_avg", "exp_avg_sq") and v.dtype == torch.float32}
            for index, saved in state_dict.get("state", {}).items()
            if params[index].dtype in (torch.float16, torch.bfloat16)
        }
        super().load_state_dict(state_dict)
        for index, moments in float32_moments.items():
            for key, value in moments.items():
                self.state[params[index]][key] = value.to(params[index].device)
        if self._distributor is not None:  # a full state: this rank keeps its shards
            for p in params:
                if is_sharded(p):
                    self.state[p] = {
                        key: shard_like(value, p) if torch.is_tensor(value) and value.shape == p.shape else value
                        for key, value in self.state[p].items()
                    }
        for group, saved in zip(self.param_groups, callables):
            for key, value in saved.items():
                if group.get(key) == CALLABLE_PLACEHOLDER:
                    group[key] = value
        for layer in self.layers:
            layer.group = self.param_groups[layer.group_index]
        for layer in self.layers:
            current = self.layer_state[layer.name]
            reference = next(iter(current.values()), None)
            saved = kronecker["layers"][layer.name]
            if self._distributor is not None:  # what this rank keeps of a full state
                saved = self._distributor.private_keys_dropped(layer.name, saved)
            momentum = layer.group.get("alpha1", 0.0) != 0.0
            # Each tensor goes where a fresh state keeps it: host counters (KFAC's
            # ``updates``) stay on the host, so reading them is no device sync.
            new_state = {
                key: value.to(
                    device=current[key].device if key in current else reference.device,
                    dtype=current[key].dtype if key in current else reference.dtype,
                )
                for key, value in saved.items()
                if momentum or not key.startswith("m_")
            }
            if momentum:  # saved without momenta (alpha1 was 0): start them at zero
                for key in ("m_K", "m_C"):
                    if key not in new_state and key[2:] in new_state:
                        new_state[key] = torch.zeros_like(new_state[key[2:]])
            if self._distributor is not None:
                new_state = self._distributor.private_keys_dropped(layer.name, new_state)
            self.layer_state[layer.name] = new_state
        devices = {layer.name: local(layer.weight).device for layer in self.layers}
        self.update_norm_avg = {
            name: value.to(device=devices[name], dtype=torch.float32)
            for name, value in kronecker.get("update_norm_avg", {}).items()
        }
        self.steps = int(kronecker["steps"])
        self.skipped_steps = int(kronecker["skipped_steps"])
        self.clipped_updates = int(kronecker.get("clipped_updates", 0))
        self.clipped_factor_updates = int(kronecker.get("clipped_factor_updates", 0))
        self._scale_hint = float(kronecker["grad_scale_hint"])
        self._clear_statistics()

    def remove_hooks(self) -> None:
        """Detach the optimizer's hooks from the model."""
        CurvatureCollector.remove(self.layers)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.layers)} Kronecker layers, {len(self.param_groups)} groups)"


__all__ = ["KroneckerOptimizer", "unwrap_model", "non_finite", "FALLBACK_DEFAULTS"]
