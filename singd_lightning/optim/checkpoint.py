"""Checks of a saved optimizer state before it is loaded: a state that does not
fit the optimizer (another method, structure, layer width or set of layers) or is
malformed is refused with a ``ValueError`` naming the entry, before anything
changes.

The functions take the :class:`~singd_lightning.optim.base.KroneckerOptimizer`
that is about to load (typed as its base class, ``torch.optim.Optimizer``): they
read its parameter groups, layer states and layouts and change none of them."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from singd_lightning.optim.hyperparameters import validate_kronecker_group

#: Stands for a schedule (a callable) in a serialised parameter group.
CALLABLE_PLACEHOLDER = "<callable>"


def _check_finite(t: Tensor, what: str, non_negative: bool = False) -> None:
    """Raise ``ValueError`` naming ``what`` if ``t`` holds inf/NaN (or negatives)."""
    if not bool(torch.isfinite(t).all()) or (non_negative and bool((t < 0).any())):
        raise ValueError(f"state_dict: {what} holds {'negative or ' if non_negative else ''}non-finite values.")


def checked_state_dict(optimizer: Optimizer, state_dict: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Validate everything ``optimizer.load_state_dict`` will use, changing nothing.

    Returns:
        A shallow copy of ``state_dict`` for PyTorch's loader (groups completed
        with options added since it was saved) and its ``kronecker`` entry.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"state_dict must be a dict from {type(optimizer).__name__}.state_dict(), got {type(state_dict).__name__}."
        )
    missing = [key for key in ("state", "param_groups", "kronecker") if key not in state_dict]
    if missing:
        raise ValueError(
            f"state_dict lacks {missing}: not a state of {type(optimizer).__name__} "
            "(it holds the keys 'state', 'param_groups' and 'kronecker')."
        )
    kronecker = state_dict["kronecker"]
    if not isinstance(kronecker, Mapping) or not isinstance(kronecker.get("layers"), Mapping):
        raise ValueError("state_dict['kronecker'] must be a dict with the layers' factors under 'layers'.")
    # Layouts first: a state of another method or structure is named as such.
    _check_layers(optimizer, kronecker)
    groups = _checked_groups(optimizer, state_dict["param_groups"])
    _check_counters(kronecker)
    _check_param_state(optimizer, state_dict["state"])
    averages = kronecker.get("update_norm_avg", {})
    if not isinstance(averages, Mapping):
        raise ValueError("state_dict['kronecker']['update_norm_avg'] must be a dict of 0-dim tensors.")
    for name, value in averages.items():
        if name not in optimizer.layer_state or not (torch.is_tensor(value) and value.numel() == 1):
            raise ValueError(f"state_dict: update_norm_avg of {name!r} is not a 0-dim tensor of a known layer.")
        _check_finite(value, f"update_norm_avg of layer {name!r}", non_negative=True)
    return {**state_dict, "param_groups": groups}, kronecker


def _checked_groups(optimizer: Optimizer, saved_groups: Any) -> list[dict]:
    if not isinstance(saved_groups, (list, tuple)) or len(saved_groups) != len(optimizer.param_groups):
        count = len(saved_groups) if isinstance(saved_groups, (list, tuple)) else type(saved_groups).__name__
        raise ValueError(
            f"state_dict has {count} parameter groups, this optimizer {len(optimizer.param_groups)}: "
            "it was saved for other parameters or options."
        )
    groups = []
    for index, (saved, current) in enumerate(zip(saved_groups, optimizer.param_groups)):
        if not isinstance(saved, Mapping) or "params" not in saved:
            raise ValueError(f"state_dict: parameter group {index} is not a dict with 'params'.")
        if len(saved["params"]) != len(current["params"]) or saved.get("role") != current["role"]:
            raise ValueError(
                f"state_dict: parameter group {index} holds {len(saved['params'])} "
                f"{saved.get('role')} parameters, this optimizer's {len(current['params'])} "
                f"{current['role']} ones: it was saved for another model or partition."
            )
        unknown = sorted(set(saved) - set(current) - {"params", "param_names"})
        if unknown:
            raise ValueError(f"state_dict: parameter group {index} has unknown options {unknown}.")
        # Options added since the state was saved keep this optimizer's values.
        merged = {**current, **saved}
        merged = {k: (current[k] if v == CALLABLE_PLACEHOLDER and callable(current.get(k)) else v) for k, v in merged.items()}
        probe = {k: v for k, v in merged.items() if k != "params"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                validate_kronecker_group(probe)
                optimizer._validate_group(probe)
            except (TypeError, ValueError) as err:
                raise ValueError(f"state_dict: parameter group {index}: {err}") from None
        groups.append({**current, **saved, "params": saved["params"]})
    return groups


def _check_counters(kronecker: Mapping) -> None:
    # The guards' counters are absent from states saved before the guards existed.
    optional = {"clipped_updates": 0, "clipped_factor_updates": 0}
    for key in ("steps", "skipped_steps", *optional):
        value = kronecker.get(key, optional.get(key))
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            raise ValueError(f"state_dict['kronecker'][{key!r}] must be an integer ≥ 0, got {value!r}.")
    hint = kronecker.get("grad_scale_hint")
    if not (isinstance(hint, (int, float)) and not isinstance(hint, bool) and math.isfinite(hint) and hint > 0):
        raise ValueError(f"state_dict['kronecker']['grad_scale_hint'] must be a finite number > 0, got {hint!r}.")


def _check_layers(optimizer: Optimizer, kronecker: Mapping) -> None:
    saved_layers = kronecker["layers"]
    missing = sorted(set(optimizer.layer_state) - set(saved_layers))
    unknown = sorted(set(saved_layers) - set(optimizer.layer_state))
    if missing or unknown:
        raise ValueError(
            "state_dict was saved for other layers: "
            + "; ".join(
                part for part in (
                    f"it lacks the factors of {missing}" if missing else "",
                    f"it has factors of unknown layers {unknown}" if unknown else "",
                ) if part
            )
            + "."
        )
    layouts = kronecker.get("layouts")
    if layouts is None:
        warnings.warn(
            "state_dict has no layer layouts (saved by an older version): only the factors' shapes are checked.",
            stacklevel=4,
        )
    elif not isinstance(layouts, Mapping):
        raise ValueError("state_dict['kronecker']['layouts'] must be a dict.")
    for layer in optimizer.layers:
        expected = optimizer._layer_layout(layer)
        if layouts is not None and layouts.get(layer.name) != expected:
            raise ValueError(
                f"state_dict: layer {layer.name!r} was saved as {layouts.get(layer.name)}, "
                f"but this optimizer expects {expected}."
            )
        saved = saved_layers[layer.name]
        if not isinstance(saved, Mapping):
            raise ValueError(f"state_dict: the factors of layer {layer.name!r} must be a dict of tensors.")
        required, optional = optimizer._layer_tensor_shapes(layer)
        absent = sorted(set(required) - set(saved))
        extra = sorted(set(saved) - set(required) - set(optional))
        if absent or extra:
            raise ValueError(
                f"state_dict: layer {layer.name!r} has the state entries {sorted(saved)}, "
                f"expected {sorted(required)} (and optionally {sorted(optional)})."
            )
        for key, value in saved.items():
            shape = required.get(key, optional.get(key))
            if not torch.is_tensor(value) or tuple(value.shape) != tuple(shape):
                got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                raise ValueError(
                    f"state_dict: {key} of layer {layer.name!r} has shape {got}, expected {tuple(shape)}."
                )
            if value.is_floating_point():
                _check_finite(value, f"{key} of layer {layer.name!r}")
            elif value.dtype == torch.bool or value.is_complex():
                raise ValueError(f"state_dict: {key} of layer {layer.name!r} has dtype {value.dtype}.")


def _check_param_state(optimizer: Optimizer, saved_state: Any) -> None:
    if not isinstance(saved_state, Mapping):
        raise ValueError("state_dict['state'] must be a dict of per-parameter states.")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for index, entry in saved_state.items():
        if not (isinstance(index, int) and 0 <= index < len(params)) or not isinstance(entry, Mapping):
            raise ValueError(f"state_dict['state'] has an entry {index!r} for no parameter of this optimizer.")
        for key, value in entry.items():
            if not torch.is_tensor(value):
                continue
            if key != "step" and tuple(value.shape) != tuple(params[index].shape):
                raise ValueError(
                    f"state_dict: {key} of parameter {index} has shape {tuple(value.shape)}, "
                    f"the parameter {tuple(params[index].shape)}."
                )
            if value.is_floating_point():
                _check_finite(value, f"{key} of parameter {index}")


__all__ = ["CALLABLE_PLACEHOLDER", "checked_state_dict"]
