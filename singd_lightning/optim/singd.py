"""SINGD: structured inverse-free natural gradient descent (SPEC §1), with its
special cases INGD (dense factors) and IKFAC (``kfac_like=True``)."""

from __future__ import annotations

import warnings
from types import MappingProxyType
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from singd_lightning.optim.base import KroneckerOptimizer
from singd_lightning.optim.curvature import LAYER_KINDS, KroneckerLayer, Rows
from singd_lightning.optim.hyperparameters import check_bool, check_choice, check_range, resolve_lr_cov
from singd_lightning.structures import Structure, StructureSpec, resolve_structure

#: Default of ``max_factor_step`` (ρ): the largest ``‖β₁ m‖₂`` of a factor update.
#: Below 1, ``I − β₁ m`` stays invertible, so one update can neither collapse nor
#: blow up a factor: ``‖K_new‖₂ ≤ (1 + ρ)‖K‖₂`` and ``σ_min(K_new) ≥ (1 − ρ) σ_min(K)``.
MAX_FACTOR_STEP = 0.5

#: Choices of ``factor_init``, the factors' values before their first update.
FACTOR_INITS = ("identity", "scaled_identity", "warm")
#: Default KL clip κ of SINGD, INGD and IKFAC (README, "Starting the factors"):
#: without it, dense INGD at a fixed lr 0.03 on MNIST-1D diverged after 30
#: epochs as its factors grew; with it, its loss kept falling. In the first
#: epochs of the short runs measured it never bound (the same accuracies).
KL_CLIP = 1e-3
#: The options that give the paper's update (SPEC §1) where the defaults go
#: beyond it: ``SINGD(model, **PAPER_UPDATE)``. The spike guards
#: (``max_factor_step``, ``update_clip``) change nothing unless they act.
PAPER_UPDATE: Mapping[str, Any] = MappingProxyType({"factor_init": "identity", "kl_clip": None})
#: Key of the 0-dim marker in a layer's state once ``factor_init`` has set its
#: factors (saved in checkpoints, so a resumed run does not start them again).
INITIALIZED = "factors_initialized"
#: The state tensors a factor update reads and replaces.
FACTOR_KEYS = ("K", "C", "m_K", "m_C")
#: Iterations of the ``"warm"`` start; from the scaled identity, the dense
#: iteration reaches ``‖Π(Kᵀ M K) − I‖ < 1e-6`` in 10–16 on the tested statistics.
WARM_ITERATIONS = 25
#: Bound on ``‖β m‖₂`` in one iteration of the ``"warm"`` start (β ≤ 1): keeps
#: ``I − β m`` invertible and the iteration a contraction (as ``max_factor_step``).
WARM_STEP_BOUND = 0.5
#: Structures whose projection Π(S) determines every entry of S that Π(Kᵀ S K)
#: depends on: their ``"warm"`` start uses the exact first statistics.
EXACT_WARM_STRUCTURES = ("dense", "diagonal", "block_diagonal", "tril", "triu")


def _structure_pair(structures) -> tuple:
    if isinstance(structures, (str, Mapping)) or not isinstance(structures, Sequence):
        structures = (structures, structures)
    if len(structures) != 2:
        raise ValueError(
            f"structures must be a pair (K's structure, C's structure), got {structures!r}."
        )
    return tuple(structures)


#: Structures by layer kind that apply unless ``layer_structures`` names the kind:
#: an embedding's ``K`` is diagonal (its statistics of one-hot inputs are token
#: counts, a diagonal matrix; a dense ``V × V`` factor would hold only zeros off it).
#: None: the group's ``structures`` for that factor.
DEFAULT_LAYER_STRUCTURES: dict[str, tuple] = {"Embedding": ("diagonal", None)}


def _plain_spec(spec: StructureSpec | None) -> StructureSpec | None:
    """A structure as a name or a dict with options (weights-only checkpoints);
    resolving raises a ValueError listing the valid names."""
    if spec is None:
        return None
    factory = resolve_structure(spec)
    return spec if isinstance(spec, str) else {"name": factory.name, **factory.options}


def _layer_structures(value: Mapping | None) -> dict[str, tuple]:
    """``layer_structures`` checked and completed with :data:`DEFAULT_LAYER_STRUCTURES`."""
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise ValueError(
            "layer_structures must be a mapping from a layer kind "
            f"({', '.join(LAYER_KINDS)}) to structures, got {value!r}."
        )
    unknown = sorted(str(kind) for kind in value if kind not in LAYER_KINDS)
    if unknown:
        raise ValueError(f"layer_structures: unknown layer kinds {unknown}; valid kinds are {list(LAYER_KINDS)}.")
    out = dict(DEFAULT_LAYER_STRUCTURES)
    for kind, pair in value.items():
        pair = (pair, pair) if pair is None else _structure_pair(pair)
        out[kind] = tuple(_plain_spec(spec) for spec in pair)
    return out


class SINGD(KroneckerOptimizer):
    """Structured inverse-free natural gradient descent (Lin, Dangel et al., 2024).

    Preconditions every ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d``/``nn.Embedding`` of ``model`` with
    ``(K Kᵀ) ⊗ (C Cᵀ)``, where the factors ``K`` (``d_K × d_K``) and ``C``
    (``d_o × d_o``) live in sparse matrix groups and are updated without any
    inversion; all other trainable parameters are trained by a first-order
    fallback (AdamW by default) inside this same optimizer.

    Args:
        model: The model; DataParallel/DistributedDataParallel wrappers are unwrapped.
        params: None (every trainable parameter), parameters, or parameter groups
            (dicts that may override any hyper-parameter below, ``structures``
            included). Weight decay, ``lr`` and ``momentum`` apply per parameter:
            a bias in a no-decay group is preconditioned with its weight all the same.
        lr: β₂, the parameter learning rate.
        momentum: α₂, momentum on the parameter updates, in [0, 1).
        damping: λ, damping of the factor updates.
        alpha1: α₁, Riemannian momentum of the factor updates, in [0, 1).
        weight_decay: γ, L2 weight decay added to the preconditioned gradient.
        T: Update the factors every ``T`` steps (statistics are only collected then).
        lr_cov: β₁, the factor learning rate: a float or a callable ``step -> float``.
        structures: ``(K's, C's)`` structure: names such as ``"diagonal"``,
            ``"block_diagonal"``, ``"hierarchical"``, ``"tril_toeplitz"`` (reference
            aliases like ``"block30diagonal"`` work), or mappings with options,
            e.g. ``{"name": "block_diagonal", "block_size": 32}``. A single value
            applies to both.
        layer_structures: Structures per layer kind (``"Linear"``, ``"Conv1d"``,
            ``"Conv2d"``, ``"Embedding"``: the ``torch.nn`` class a layer derives
            from), overriding ``structures`` for those layers: a pair or one
            structure for both, None in a pair for ``structures``' own, e.g.
            ``{"Embedding": ("diagonal", "dense")}``. Unnamed kinds keep
            :data:`DEFAULT_LAYER_STRUCTURES`: an embedding's ``K`` is diagonal.
        kfac_like: IKFAC: drop the trace scaling and Riemannian momentum (α₁ = 0).
        kfac_approx: ``"expand"`` or ``"reduce"`` for weight-sharing dimensions.
        loss_average: ``"batch"``, ``"batch+sequence"`` or None (summed loss).
        normalize_lr_cov: Normalised factor steps: β₁ / max(1, max|m|).
        max_factor_step: Spike guard of the factors: a factor update ``K ← K − β₁ K m``
            with ``‖β₁ m‖₂ > max_factor_step`` has its step ``m`` scaled down to
            that bound, and leaves the Riemannian momentum as it was; in
            ``(0, 1)``, or None for the paper's update, unbounded.
        factor_init: The factors before their first update: ``"identity"`` (the
            default and the paper: K = C = I), ``"scaled_identity"`` (``c_K I``,
            ``c_C I`` with the scale of the fixed point of the update for the
            first statistics, from their traces) or ``"warm"`` (from the scaled identity, the factor update
            repeated on the first statistics until it settles, within the
            structure). Applied at a layer's first preconditioner update, in
            place of that update; see :meth:`_initial_factors`. The warm start
            costs ``O(d³)`` once per factor of size ``d``: 0.8 s for a dense
            768 × 768 layer and 20 s for a dense 768 × 3072 layer on a 2-core
            CPU (``scripts/warm_start.py --start-cost``). It is not the default: from one batch whose rows span less
            than a layer's input (batch < width) it sets a large preconditioner
            on the unseen directions, and the next batches' updates there trip
            the spike guards (README, "Starting the factors").
        kl_clip: KL clip κ: every preconditioned update of the layers that share
            this value is scaled by ``min(1, sqrt(κ / |Σ lr² ⟨u, g⟩|))``, which
            bounds the step's second-order KL divergence (default
            :data:`KL_CLIP`); None: off, the paper's update.
        preconditioner_dtype: ``(K's, C's)`` dtype; None means the weight's dtype.
        batch_layers: Treat the layers of one parameter group whose factors have
            the same structures, shapes and dtypes (a transformer's repeated
            blocks) as one batch: their statistics projected, factors updated,
            gradients preconditioned and updates guarded by one batched call each
            instead of one call per layer; the same arithmetic in a few times
            fewer operations (results equal up to rounding). None (default): on
            CUDA, where every small operation is a kernel launch; on the CPU,
            where it changes a training step by a few per cent either way, layer
            by layer, holding one layer's gradient copy at a time
            (``scripts/batch_layers.py``). It may change between steps.
        **kwargs: Fallback and loss-scaler options of
            :class:`~singd_lightning.optim.base.KroneckerOptimizer`.

    Example:
        >>> optimizer = SINGD(model, lr=1e-3, structures=("diagonal", "diagonal"))
        >>> loss_fn(model(x), y).backward()
        >>> optimizer.step()
        >>> optimizer.zero_grad()
    """

    # The hooks project the statistics with K and C; preconditioning uses them too.
    statistics_keys = ("K", "C")
    precondition_keys = ("K", "C")

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[nn.Parameter] | Iterable[dict] | None = None,
        lr: float = 1e-3,
        momentum: float = 0.9,
        damping: float = 1e-3,
        alpha1: float = 0.5,
        weight_decay: float = 0.0,
        T: int = 10,
        lr_cov: float | Callable[[int], float] = 1e-2,
        structures: tuple[StructureSpec, StructureSpec] | StructureSpec = ("dense", "dense"),
        layer_structures: Mapping[str, Any] | None = None,
        kfac_like: bool = False,
        kfac_approx: str = "expand",
        loss_average: str | None = "batch",
        normalize_lr_cov: bool = False,
        max_factor_step: float | None = MAX_FACTOR_STEP,
        preconditioner_dtype: tuple = (None, None),
        factor_init: str = "identity",
        kl_clip: float | None = KL_CLIP,
        batch_layers: bool | None = None,
        **kwargs,
    ) -> None:
        if batch_layers is not None and not isinstance(batch_layers, bool):
            raise ValueError(f"batch_layers must be None, True or False, got {batch_layers!r}.")
        self._layouts: dict[str, tuple[Structure, Structure]] = {}
        defaults = dict(
            lr=lr,
            momentum=momentum,
            damping=damping,
            alpha1=alpha1,
            weight_decay=weight_decay,
            T=T,
            lr_cov=lr_cov,
            structures=structures,
            layer_structures=layer_structures,
            kfac_like=kfac_like,
            kfac_approx=kfac_approx,
            loss_average=loss_average,
            normalize_lr_cov=normalize_lr_cov,
            max_factor_step=max_factor_step,
            preconditioner_dtype=preconditioner_dtype,
            factor_init=factor_init,
        )
        super().__init__(model, params, defaults, kl_clip=kl_clip, **kwargs)
        self.batch_layers = batch_layers

    @property
    def batch_layers(self) -> bool | None:
        """Whether same-shaped layers are updated and preconditioned in batches
        (None: on CUDA); see the constructor. It may change between steps."""
        return self.__dict__.get("_batch_layers")

    @batch_layers.setter
    def batch_layers(self, value: bool | None) -> None:
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"batch_layers must be None, True or False, got {value!r}.")
        if self.__dict__.get("_stats"):
            raise ValueError(
                "batch_layers cannot change between a backward pass and its step: the statistics "
                "collected so far wait to be projected one way; change it after step() or zero_grad()."
            )
        self._batch_layers = value

    def _validate_group(self, group: dict) -> None:
        check_range("alpha1", group["alpha1"], 0.0, 1.0)
        check_bool("kfac_like", group["kfac_like"])
        check_bool("normalize_lr_cov", group["normalize_lr_cov"])
        check_choice("factor_init", group["factor_init"], FACTOR_INITS)
        if group["max_factor_step"] is not None:
            check_range("max_factor_step", group["max_factor_step"], 0.0, 1.0, low_inclusive=False)
        lr_cov = group["lr_cov"]
        if not callable(lr_cov):
            check_range("lr_cov", lr_cov, 0.0)
        group["layer_structures"] = _layer_structures(group["layer_structures"])
        pair = _structure_pair(group["structures"])
        # Keep plain names/dicts in the group so that state_dicts stay weights-only;
        # resolving raises a ValueError listing the valid names.
        group["structures"] = tuple(
            spec if isinstance(spec, str) else {"name": factory.name, **factory.options}
            for spec, factory in ((spec, resolve_structure(spec)) for spec in pair)
        )
        if group["kfac_like"] and group["alpha1"] != 0.0:
            warnings.warn(
                f"kfac_like=True (IKFAC) uses no Riemannian momentum: alpha1={group['alpha1']} "
                "is set to 0.",
                stacklevel=4,
            )
            group["alpha1"] = 0.0

    # ----------------------------------------------------------- structures
    def layouts(self, layer: KroneckerLayer) -> tuple[Structure, Structure]:
        """The (K, C) structure layouts of ``layer``."""
        layouts = self._layouts.get(layer.name)
        if layouts is None:
            spec_k, spec_c = layer.group["structures"]
            kind_k, kind_c = layer.group["layer_structures"].get(layer.kind, (None, None))
            spec_k, spec_c = spec_k if kind_k is None else kind_k, spec_c if kind_c is None else kind_c
            layouts = (resolve_structure(spec_k)(layer.dim_in), resolve_structure(spec_c)(layer.dim_out))
            self._layouts[layer.name] = layouts
        return layouts

    def _init_layer_state(self, layer: KroneckerLayer) -> dict[str, Tensor]:
        layout_k, layout_c = self.layouts(layer)
        dtype_k, dtype_c = self.preconditioner_dtypes(layer)
        device = layer.weight.device
        state = {
            "K": layout_k.identity(dtype=dtype_k, device=device),
            "C": layout_c.identity(dtype=dtype_c, device=device),
        }
        if layer.group["alpha1"] != 0.0:
            state["m_K"] = layout_k.zeros(dtype=dtype_k, device=device)
            state["m_C"] = layout_c.zeros(dtype=dtype_c, device=device)
        return state

    def _layer_layout(self, layer: KroneckerLayer) -> dict:
        layout_k, layout_c = self.layouts(layer)
        layout = {
            "method": "singd",
            "K": {"structure": layout_k.name, "dim": layout_k.dim, **layout_k.options()},
            "C": {"structure": layout_c.name, "dim": layout_c.dim, **layout_c.options()},
        }
        if layer.kind == "Embedding":  # (the other kinds' layouts predate the key)
            layout["module"] = layer.kind
        return layout

    def _layer_tensor_shapes(self, layer: KroneckerLayer) -> tuple[dict, dict]:
        layout_k, layout_c = self.layouts(layer)
        shapes = {"K": (layout_k.numel,), "C": (layout_c.numel,)}
        return shapes, {"m_K": shapes["K"], "m_C": shapes["C"], INITIALIZED: ()}

    def _statistics_numel(self, layer: KroneckerLayer) -> tuple[int, int]:
        sizes = []
        for layout, deferred in zip(self.layouts(layer), self._deferred_sides(layer)):
            sizes.append(layout.gram_statistic_numel() if deferred else layout.numel)
        return sizes[0], sizes[1]

    def _statistics(self, layer: KroneckerLayer, x_in: Rows, x_out: Rows) -> tuple[Tensor, Tensor]:
        state = self.layer_state[layer.name]
        out = []
        for deferred, key, layout, rows in zip(self._deferred_sides(layer), ("K", "C"), self.layouts(layer),
                                               (x_in, x_out)):
            out.append(layout.gram_statistic(rows) if deferred else layout.project_gram_rows(state[key], rows))
        return out[0], out[1]

    def _deferred_sides(self, layer: KroneckerLayer) -> tuple[bool, bool]:
        """Whether the hooks collect K's (C's) :meth:`~singd_lightning.structures.Structure.gram_statistic`,
        for the factor update to project (``Π(Kᵀ S K)`` is linear in ``S``: the sum
        over passes and ranks commutes with it): for the dense factors of a
        sharded model (:meth:`_raw_sides`), and with ``batch_layers`` for every
        structure that has one, so that a batch's projections run as one."""
        batching = self._batching([layer])
        return tuple(  # type: ignore[return-value]
            raw or (batching and layout.gram_statistic_numel() is not None)
            for raw, layout in zip(self._raw_sides(layer), self.layouts(layer))
        )

    # ------------------------------------------------------ sharded models
    def _raw_sides(self, layer: KroneckerLayer) -> tuple[bool, bool]:
        """Whether the hooks collect K's (C's) statistic unprojected, ``X Xᵀ``, for
        the layer's owner to project: dense factors of a sharded model, which then
        live on the owner only (``Π(Kᵀ S K) = Kᵀ S K`` is linear in ``S``; the sum
        over passes and ranks commutes with it)."""
        distributor = getattr(self, "_distributor", None)
        if distributor is None or not distributor.sharded:
            return False, False
        layout_k, layout_c = self.layouts(layer)
        return layout_k.name == "dense", layout_c.name == "dense"

    def _shared_keys(self, layer: KroneckerLayer, sharded: bool) -> tuple[str, ...]:
        if not sharded:
            return super()._shared_keys(layer, sharded)
        # Dense factors are projected by their owner (see _raw_sides).
        return tuple(key for key, layout in zip(("K", "C"), self.layouts(layer)) if layout.name != "dense")

    def _projected(
        self, layer: KroneckerLayer, h_k: Tensor, h_c: Tensor, state: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """``Π(Kᵀ S K)``, ``Π(Cᵀ S C)`` of the sides whose reduced statistic ``S`` the
        hooks left unprojected (:meth:`_deferred_sides`), with the factors in
        ``state`` (default: ``layer``'s own; or a batch's, stacked with ``h_k``
        and ``h_c``)."""
        state = self.layer_state[layer.name] if state is None else state
        out = []
        for deferred, key, layout, h in zip(self._deferred_sides(layer), ("K", "C"), self.layouts(layer), (h_k, h_c)):
            out.append(layout.project_gram_statistic(state[key], h) if deferred else h)
        return out[0], out[1]

    # --------------------------------------------------------------- update
    def _update_preconditioner(self, layer: KroneckerLayer, h_k: Tensor, h_c: Tensor) -> dict[str, Tensor]:
        """The new factors of one layer (with its own factor-step bound)."""
        updates, _ = self._new_layer_states([layer], {layer.name: (h_k, h_c)})
        return updates[0][1]

    def _new_layer_states(self, layers, reduced):
        layers = [layer for layer in layers if layer.name in reduced]
        # A layer's first update with factor_init other than "identity" sets its
        # factors instead; it goes through the same finiteness check and undo.
        starting = [layer for layer in layers if self._starts(layer)]
        updates = [(layer, self._initial_factors(layer, *self._projected(layer, *reduced[layer.name])))
                   for layer in starting]
        # Per batch of layers (one layer, or same-shaped layers with batch_layers):
        # their states and statistics, stacked along a first dimension if several.
        steps = []
        for batch in self._layer_batches([layer for layer in layers if layer not in starting]):
            if len(batch) == 1:
                state = self.layer_state[batch[0].name]
                h_k, h_c = reduced[batch[0].name]
            else:
                states = [self.layer_state[layer.name] for layer in batch]
                state = {key: torch.stack([s[key] for s in states]) for key in FACTOR_KEYS if key in states[0]}
                h_k = torch.stack([reduced[layer.name][0] for layer in batch])
                h_c = torch.stack([reduced[layer.name][1] for layer in batch])
            h_k, h_c = self._projected(batch[0], h_k, h_c, state)
            steps.append((batch, state, *self._factor_steps(batch[0], h_k, h_c, state)))
        clipped = self._bound_factor_steps(steps)
        for batch, state, steps_k_c, new_state in steps:
            # K ← K − β₁ K m_K: a first-order step of K exp(−β₁ m_K), stays in the group.
            for key, layout, m, beta in steps_k_c:
                new_state[key] = layout.compose(state[key], m).mul_(_per_row(-beta)).add_(state[key])
            if len(batch) == 1:
                updates.append((batch[0], new_state))
            else:  # each layer's rows (views: see state_dict)
                updates += [(layer, {key: value[i] for key, value in new_state.items()})
                            for i, layer in enumerate(batch)]
        return updates, clipped

    def _layer_batches(self, layers: list[KroneckerLayer]) -> list[list[KroneckerLayer]]:
        """``layers`` in batches that one batched call can update or precondition:
        with ``batch_layers``, the layers of the same factor structures,
        dimensions and dtypes, device and parameter group (whose hyper-parameters
        then apply to all); otherwise one layer each."""
        if not layers or not self._batching(layers):
            return [[layer] for layer in layers]
        batches: dict[tuple, list[KroneckerLayer]] = {}
        for layer in layers:
            batches.setdefault(self._batch_key(layer), []).append(layer)
        return list(batches.values())

    def _batch_key(self, layer: KroneckerLayer) -> tuple:
        """What layers of one batch share (see :meth:`_layer_batches`)."""
        state, weight = self.layer_state[layer.name], layer.weight
        return (*self.layouts(layer), state["K"].dtype, state["C"].dtype, weight.dtype, weight.device, id(layer.group))

    # ------------------------------------------------------ initial factors
    def _starts(self, layer: KroneckerLayer) -> bool:
        """Whether ``layer``'s next factor update is its ``factor_init`` start."""
        return layer.group["factor_init"] != "identity" and INITIALIZED not in self.layer_state[layer.name]

    def _initial_factors(self, layer: KroneckerLayer, h_k: Tensor, h_c: Tensor) -> dict[str, Tensor]:
        """The factors ``factor_init`` starts ``layer`` with, from its first
        statistics ``h_k = Π(Sₐ)``, ``h_c = Π(S_g)`` (collected at K = C = I).

        The update's fixed point (SPEC §1) for INGD/SINGD is
        ``Π(Kᵀ M_K K) = I`` with ``M_K = τ(Cᵀ S_g C) Sₐ + λ τ(CᵀC) I`` (and the
        same for C), for IKFAC ``M_K = Sₐ + λ I``: densely, ``K Kᵀ = M_K⁻¹``.

        ``"scaled_identity"``: ``K = c_K I``, ``C = c_C I`` with that fixed point's
        trace: ``τ(c_K² M_K) = 1``. For IKFAC ``c_K² = 1/(a + λ)``,
        ``c_C² = 1/(g + λ)`` (``a = τ(Sₐ)``, ``g = τ(S_g)``); for INGD/SINGD the
        trace terms fix only the product, ``c_K² c_C² = 1/(a g + λ)`` (K → sK,
        C → C/s leave the update unchanged), split as ``c_K² ∝ 1/(a + √λ)``,
        ``c_C² ∝ 1/(g + √λ)`` so that each factor takes its own statistic's scale.

        ``"warm"``: from the scaled identity, the update ``K ← K − β K m`` with
        α₁ = 0 and ``m = ½ (Π(Kᵀ M_K K) − I)``, alternating K and C, for
        :data:`WARM_ITERATIONS` iterations with ``β = min(1, ρ/‖m‖)`` (ρ =
        :data:`WARM_STEP_BOUND`). Near the fixed point, ``Π(Kᵀ M K) − I`` shrinks
        by ``1 − β`` per iteration for every structure whose Π keeps the symmetric
        part (``Π(E) + Π(E)ᵀ = 2E`` on the structure's span): β = 1 is the
        Newton–Schulz iteration for ``M^(-1/2)``, quadratically convergent; far
        from it the bounded step keeps ``I − β m`` invertible (every eigenvalue
        of ``Kᵀ M K`` moves towards 1). ``M`` is the symmetric matrix whose
        projection is the statistic, ``(Π(S) + Π(S)ᵀ)/2``: S itself (as far as
        Π(Kᵀ S K) depends on it) for dense, triangular, diagonal and
        block-diagonal factors; for Toeplitz, hierarchical and rank-one factors
        the structure's partial view of S, with its off-diagonal part scaled
        down to diagonal dominance so that it stays positive semi-definite
        (the fixed point then exists). It is formed densely: this start costs
        ``O(d³)`` per iteration, once per layer.
        """
        group = layer.group
        layout_k, layout_c = self.layouts(layer)
        state = self.layer_state[layer.name]
        K, C = state["K"], state["C"]
        damping = group["damping"]
        a = layout_k.average_trace(h_k).to(K.dtype)
        g = layout_c.average_trace(h_c).to(C.dtype)
        if group["kfac_like"]:
            scale_k, scale_c = (a + damping).rsqrt(), (g + damping).rsqrt()
        else:
            root = damping**0.5
            # Guarded so that a layer with zero statistics gets (√λ)^(-1/2) per factor.
            split = ((a + root) * (g + root) / (a * g + damping)).sqrt()
            scale_k, scale_c = (split / (a + root)).sqrt(), (split / (g + root)).sqrt()
        new_K = layout_k.identity(dtype=K.dtype, device=K.device).mul_(scale_k)
        new_C = layout_c.identity(dtype=C.dtype, device=C.device).mul_(scale_c)
        if group["factor_init"] == "warm":
            new_K, new_C = self._warm_factors(layer, new_K, new_C, h_k, h_c)
        new_state = {"K": new_K, "C": new_C, INITIALIZED: torch.ones((), dtype=K.dtype, device=K.device)}
        for key in ("m_K", "m_C"):
            if key in state:
                new_state[key] = torch.zeros_like(state[key])
        return new_state

    def _warm_factors(
        self, layer: KroneckerLayer, K: Tensor, C: Tensor, h_k: Tensor, h_c: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The ``"warm"`` iteration of :meth:`_initial_factors`, from ``K``, ``C``."""
        group = layer.group
        layout_k, layout_c = self.layouts(layer)
        damping, kfac_like = group["damping"], group["kfac_like"]
        # At least float32: the iteration squares the factors' condition.
        dtype_k = torch.promote_types(K.dtype, torch.float32)
        dtype_c = torch.promote_types(C.dtype, torch.float32)
        factors = {"K": K.to(dtype_k), "C": C.to(dtype_c)}
        layouts = {"K": layout_k, "C": layout_c}
        stats = {}
        for key, h, dtype in (("K", h_k, dtype_k), ("C", h_c, dtype_c)):
            dense = layouts[key].to_dense(h.to(dtype))
            sym = (dense + dense.mT) / 2
            if layouts[key].name not in EXACT_WARM_STRUCTURES:
                # Π(S) holds only part of S: the matrix completed from it may be
                # indefinite, and the iteration has no fixed point then. Scaling
                # its off-diagonal part down to diagonal dominance (Gershgorin)
                # makes it positive semi-definite.
                diag = sym.diagonal()
                off = sym - diag.diag_embed()
                ratio = diag / off.abs().sum(dim=-1).clamp(min=torch.finfo(dtype).tiny)
                sym = off.mul_(ratio.min().clamp(max=1.0)).add_(diag.diag_embed())
            stats[key] = sym

        def grams(key: str) -> tuple[Tensor, Tensor]:
            # Π(Kᵀ M K) with structured products (Kᵀ (Kᵀ M)ᵀ = Kᵀ M K), and Π(KᵀK).
            layout, factor = layouts[key], factors[key]
            x = layout.matmul(factor, layout.matmul(factor, stats[key], transpose=True).mT, transpose=True)
            return layout.project((x + x.mT) / 2), layout.project_self_gram(factor)

        # Each factor's grams, recomputed only when it changes.
        current = {key: grams(key) for key in ("K", "C")}
        for _ in range(WARM_ITERATIONS):
            for key, other in (("K", "C"), ("C", "K")):
                layout, factor = layouts[key], factors[key]
                data, self_gram = current[key]
                m = data.clone()
                if kfac_like:
                    m.add_(self_gram, alpha=damping)
                else:
                    other_layout = layouts[other]
                    other_data, other_self = current[other]
                    tr_data = other_layout.average_trace(other_data).to(m.dtype)
                    tr_self = other_layout.average_trace(other_self).to(m.dtype)
                    m.mul_(tr_data).addcmul_(self_gram, damping * tr_self)
                layout.add_identity_(m, -1.0)
                m.mul_(0.5)
                # β = min(1, ρ / bound on ‖m‖₂): no host synchronisation.
                beta = (WARM_STEP_BOUND / layout.spectral_norm_bound(m).clamp(min=1e-30)).clamp(max=1.0)
                factors[key] = layout.compose(factor, m).mul_(-beta.to(m.dtype)).add_(factor)
                current[key] = grams(key)
        return factors["K"].to(K.dtype), factors["C"].to(C.dtype)

    def load_state_dict(self, state_dict: dict) -> None:
        """See :meth:`KroneckerOptimizer.load_state_dict`. A state saved before
        ``factor_init`` existed has no start markers: if its run had already
        stepped, its layers keep their saved factors (starting them again would
        throw learnt factors away)."""
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        before_factor_init = isinstance(groups, list) and any(
            isinstance(g, dict) and "factor_init" not in g for g in groups
        )
        super().load_state_dict(state_dict)
        if self.steps == 0 or not before_factor_init:
            return
        for layer in self.layers:
            state = self.layer_state[layer.name]
            if self._starts(layer):
                state[INITIALIZED] = torch.ones((), dtype=state["K"].dtype, device=state["K"].device)

    def _factor_steps(
        self, layer: KroneckerLayer, h_k: Tensor, h_c: Tensor, state: dict[str, Tensor] | None = None
    ) -> tuple[list, dict[str, Tensor]]:
        """The Riemannian steps ``m_K``, ``m_C`` (momentum included) and their
        learning rates: ``([(key, layout, m, β), ...], new momenta)``, for the
        factors in ``state`` (default: ``layer``'s own). ``state``, ``h_k`` and ``h_c``
        may stack a batch of same-shaped layers of ``layer``'s parameter group
        along a first dimension (``(L, numel)``): every step and rate is then
        per row (``β`` of shape ``(L,)`` where it is a tensor)."""
        group = layer.group
        layout_k, layout_c = self.layouts(layer)
        state = self.layer_state[layer.name] if state is None else state
        K, C = state["K"], state["C"]
        damping, alpha1 = group["damping"], group["alpha1"]
        ktk = layout_k.project_self_gram(K)
        ctc = layout_c.project_self_gram(C)
        # The statistics h_k, h_c are this update's own buffers: they become the
        # momenta in place (fewer passes over dense factors).
        if group["kfac_like"]:
            m_k = h_k.add_(ktk, alpha=damping)
            m_c = h_c.add_(ctc, alpha=damping)
        else:
            # τ(·) are tensors (0-dim, or one per row of a batch): no host synchronisation.
            tr_hk, tr_hc = layout_k.average_trace(h_k), layout_c.average_trace(h_c)
            tr_ktk, tr_ctc = layout_k.average_trace(ktk), layout_c.average_trace(ctc)
            m_k = h_k.mul_(_per_row(tr_hc.to(h_k.dtype))).addcmul_(ktk, _per_row((damping * tr_ctc).to(ktk.dtype)))
            m_c = h_c.mul_(_per_row(tr_hk.to(h_c.dtype))).addcmul_(ctc, _per_row((damping * tr_ktk).to(ctc.dtype)))
        layout_k.add_identity_(m_k, -1.0)
        layout_c.add_identity_(m_c, -1.0)
        half = 0.5 * (1.0 - alpha1) if group["normalize_lr_cov"] else 0.5
        m_k.mul_(half)
        m_c.mul_(half)
        new_state = {}
        if alpha1 != 0.0:
            m_k.add_(state["m_K"], alpha=alpha1)
            m_c.add_(state["m_C"], alpha=alpha1)
            new_state["m_K"], new_state["m_C"] = m_k, m_c
        beta = resolve_lr_cov(group["lr_cov"], self.steps)
        beta_k = beta_c = beta
        if group["normalize_lr_cov"]:
            beta_k = beta / layout_k.max_abs(m_k).clamp(min=1.0)
            beta_c = beta / layout_c.max_abs(m_c).clamp(min=1.0)
        return [("K", layout_k, m_k, beta_k), ("C", layout_c, m_c, beta_c)], new_state

    def _bound_factor_steps(self, steps: list) -> int:
        """Apply ``max_factor_step`` to every factor step, in place; return how many
        were bounded.

        A guaranteed upper bound of ``‖β₁ m‖₂`` (``sqrt(‖m‖₁‖m‖_∞)``, two structured
        products with a vector) clears nearly every step with one host
        synchronisation for all layers; only the steps it cannot clear get the
        power-iteration estimate of ``‖m‖₂``, and a step above the bound is scaled
        down to it, leaving the momentum as it was (an outlier is applied once,
        bounded, not carried on). A cleared step is the paper's, bit for bit.
        """
        candidates, bounds = [], []
        for batch, _, steps_k_c, new_state in steps:
            bound = batch[0].group["max_factor_step"]
            if bound is None:
                continue
            rows = range(len(batch)) if len(batch) > 1 else [None]  # None: not stacked
            for key, layout, m, beta in steps_k_c:
                candidates += [(batch, row, key, layout, m, beta, bound, new_state) for row in rows]
                bounds.append((layout.spectral_norm_bound(m) * beta).reshape(-1).float())
        if not candidates:
            return 0
        device = bounds[0].device
        limits = torch.tensor([c[6] for c in candidates], dtype=torch.float32, device=device)
        cleared = (torch.cat([b.to(device) for b in bounds]) <= limits).tolist()
        flags = []
        for (batch, row, key, layout, m, beta, bound, new_state), ok in zip(candidates, cleared):
            if ok:
                continue
            layer = batch[0] if row is None else batch[row]
            if row is not None:  # this layer's row of the batch
                m, beta = m[row], beta[row] if isinstance(beta, Tensor) and beta.ndim else beta
            step = layout.spectral_norm(m) * beta
            over = step > bound
            m.mul_(torch.where(over, bound / step, torch.ones_like(step)).to(m.dtype))
            momentum = "m_" + key
            if momentum in new_state:
                kept = torch.where(over, self.layer_state[layer.name][momentum], m)
                if row is None:
                    new_state[momentum] = kept
                else:
                    if new_state[momentum] is m._base:  # the momenta are the steps: keep those apart
                        new_state[momentum] = new_state[momentum].clone()
                    new_state[momentum][row] = kept
            flags.append(over.reshape(()))
        return int(torch.stack([f.to(device) for f in flags]).sum()) if flags else 0

    def _layer_diagnostics(self, layer, old, new):
        diagnostics = super()._layer_diagnostics(layer, old, new)
        layout_k, layout_c = self.layouts(layer)
        # τ(K Kᵀ) = ‖K‖²_F / d = τ(Π(Kᵀ K)): every projection keeps the trace.
        diagnostics["tau_KKt"] = layout_k.average_trace(layout_k.project_self_gram(new["K"])).float()
        diagnostics["tau_CCt"] = layout_c.average_trace(layout_c.project_self_gram(new["C"])).float()
        return diagnostics

    def _precondition(self, layer: KroneckerLayer, grad: Tensor) -> Tensor:
        return self._apply_outer_forms(layer.name, [layer], grad)

    def _apply_outer_forms(self, key: Any, layers: list[KroneckerLayer], grad: Tensor) -> Tensor:
        """``C Cᵀ Ĝ K Kᵀ`` for one layer's gradient ``(d_o, d_K)``, or for a batch's
        (:meth:`_layer_batches`, ``key`` its :meth:`_batch_key`) stacked
        ``(L, d_o, d_K)``: only structured products, in the gradient's dtype."""
        layout_k, layout_c = self.layouts(layers[0])
        state = self.layer_state[layers[0].name]
        form_k, form_c = self._outer_forms(key, layers)
        # Ĝ K Kᵀ = (K (Kᵀ Ĝᵀ))ᵀ, then C (Cᵀ ·).
        x = layout_k.matmul_outer_form(form_k, grad.mT.to(state["K"].dtype))
        x = layout_c.matmul_outer_form(form_c, x.mT.to(state["C"].dtype))
        return x.to(grad.dtype)

    def _preconditioned(self, layers: list[KroneckerLayer], gradients: dict[str, Tensor] | None = None):
        """Per batch of :meth:`_layer_batches` (same-shaped layers, with
        ``batch_layers``), one batched preconditioning; other layers one by one
        (see :meth:`KroneckerOptimizer._preconditioned`)."""
        for batch in self._layer_batches(layers):
            if len(batch) == 1:
                yield from super()._preconditioned(batch, gradients)
                continue
            if gradients is None:
                grads = KroneckerLayer.stacked_gradient_matrices(batch)  # (L, d_o, d_K)
            else:
                grads = torch.stack([gradients[layer.name] for layer in batch])
            yield batch, grads, self._apply_outer_forms(self._batch_key(batch[0]), batch, grads)

    def _batching(self, layers: list[KroneckerLayer]) -> bool:
        """Whether to batch same-shaped layers (``batch_layers``; None: on CUDA)."""
        batch = self.batch_layers
        return batch if batch is not None else layers[0].weight.device.type == "cuda"

    def _outer_forms(self, key: Any, layers: list[KroneckerLayer]) -> tuple:
        """The :meth:`~singd_lightning.structures.Structure.outer_form` of ``K`` and
        ``C`` of one layer, or of a batch's (stacked along a new first dimension,
        one batched call per factor); ``key`` names the layer or batch.

        With ``T > 1`` they are kept from one step to the next while the factors
        stay the same tensors, unchanged in place (their version counters): the
        ``T − 1`` steps between two updates then only apply them, which for
        block-diagonal and hierarchical factors skips most of the small products
        of a step. At ``T = 1`` every step has new factors: nothing is kept.
        """
        layout_k, layout_c = self.layouts(layers[0])
        factors = [(self.layer_state[layer.name]["K"], self.layer_state[layer.name]["C"]) for layer in layers]
        cache = self.__dict__.setdefault("_outer_form_cache", {})
        keep = all(layer.group["T"] > 1 for layer in layers) and not any(
            t.is_inference() for pair in factors for t in pair)
        versions = [(K, K._version, C, C._version) for K, C in factors]
        cached = cache.get(key)
        if keep and cached is not None and _same_factors(cached[0], versions):
            return cached[1]
        if len(factors) == 1:
            K, C = factors[0]
        else:
            K, C = torch.stack([K for K, _ in factors]), torch.stack([C for _, C in factors])
        forms = layout_k.outer_form(K), layout_c.outer_form(C)
        if keep:
            cache[key] = (versions, forms)
        else:
            cache.pop(key, None)
        return forms


def _per_row(value: float | Tensor) -> float | Tensor:
    """A per-layer scalar (a float, a 0-dim tensor or one value per row of a
    batch, ``(L,)``) shaped to scale a layer's flat storage (``(numel,)`` or
    ``(L, numel)``) row by row; a float or 0-dim tensor as it is."""
    return value.unsqueeze(-1) if isinstance(value, Tensor) and value.ndim else value


def _same_factors(cached: list[tuple], current: list[tuple]) -> bool:
    """Whether two lists of ``(K, K._version, C, C._version)`` name the same
    tensors (identity) at the same versions (no in-place change since)."""
    return len(cached) == len(current) and all(
        a is b if isinstance(a, Tensor) else a == b
        for old, new in zip(cached, current) for a, b in zip(old, new)
    )


class INGD(SINGD):
    """INGD (Lin et al., ICML 2023): SINGD with dense factors."""

    def __init__(self, model: nn.Module, params=None, **kwargs) -> None:
        kwargs.setdefault("structures", ("dense", "dense"))
        super().__init__(model, params, **kwargs)


class IKFAC(SINGD):
    """IKFAC: the inverse-free KFAC of the SINGD paper (``kfac_like=True``, α₁ = 0)."""

    def __init__(self, model: nn.Module, params=None, **kwargs) -> None:
        kwargs["kfac_like"] = True
        kwargs.setdefault("alpha1", 0.0)
        super().__init__(model, params, **kwargs)
