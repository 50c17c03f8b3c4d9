"""The merge contract, state-dict arithmetic and the method registry.

Every merge method is a function over state dicts,

    fn(base, models, /, *, <its parameters>) -> dict[str, Tensor]

registered once in `MERGE_METHODS` under its mergekit-style name (`@merge_method("ties", ...)`), and called directly
or through `merge("ties", base, models, density=0.2)`. The shared contract, enforced by `plan_merge`:

* `base` is a state dict (`Mapping[str, Tensor]`) or None for methods that do not need one (`linear`, `fisher`);
  `models` is a non-empty sequence of state dicts. Every model must have exactly the reference's keys (the base, or
  the first model when there is no base), with the same shapes and dtypes; the first difference raises
  `StateDictMismatchError` naming the key and the model.
* Inputs are never modified, and the result shares no storage with them (every output tensor is new).
* Floating tensors are merged in at least float32 (float64 stays float64) and cast back to the reference's dtype, so
  a bfloat16 model merges to bfloat16. Non-floating tensors (integer counters, boolean masks) and keys matching an
  `exclude` regex are copied from the reference unchanged.
* Tensors the reference *ties* (two keys for one storage, like a tied embedding and LM head) are merged once, and the
  output ties them again (both keys hold the same tensor object), so random methods cannot untie them and global
  methods count them once.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import torch

__all__ = [
    "StateDict",
    "StateDictMismatchError",
    "MergePlan",
    "plan_merge",
    "compute_dtype",
    "per_model",
    "state_dict_sub",
    "state_dict_add",
    "state_dict_mul",
    "task_vectors",
    "MethodInfo",
    "MERGE_METHODS",
    "METHOD_INFO",
    "PARAMETER_ALIASES",
    "merge_method",
    "method_parameters",
    "merge",
]

StateDict = Mapping[str, torch.Tensor]
MergeFn = Callable[..., dict[str, torch.Tensor]]


class StateDictMismatchError(ValueError):
    """Two state dicts that should line up do not: a missing or extra key, or a different shape or dtype."""


# ----------------------------------------------------------------------------------------------------------------
# Checking inputs
# ----------------------------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a merge computes in: float64 stays float64, every other floating dtype becomes float32."""
    return torch.promote_types(dtype, torch.float32)


def _check_mapping(state: Any, name: str) -> None:
    if not isinstance(state, Mapping):
        raise TypeError(f"{name} must be a state dict (a Mapping[str, Tensor]), got {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}[{key!r}] must be a torch.Tensor, got {type(value).__name__}")


def check_compatible(reference: StateDict, other: StateDict, *, reference_name: str, other_name: str) -> None:
    """Raise `StateDictMismatchError` at the first key, shape or dtype where `other` differs from `reference`."""
    for key in reference:
        if key not in other:
            missing = [k for k in reference if k not in other]
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise StateDictMismatchError(f"{other_name} has no key {key!r}, which {reference_name} has{more}")
    for key in other:
        if key not in reference:
            extra = [k for k in other if k not in reference]
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise StateDictMismatchError(f"{other_name} has key {key!r}, which {reference_name} lacks{more}")
    for key, ref in reference.items():
        value = other[key]
        if value.shape != ref.shape:
            raise StateDictMismatchError(
                f"key {key!r}: {other_name} has shape {tuple(value.shape)} but {reference_name} has {tuple(ref.shape)}"
            )
        if value.dtype != ref.dtype:
            raise StateDictMismatchError(
                f"key {key!r}: {other_name} has dtype {value.dtype} but {reference_name} has {ref.dtype}"
            )


def _storage_id(tensor: torch.Tensor) -> tuple | None:
    if tensor.numel() == 0 or tensor.device.type == "meta":
        return None
    return (
        tensor.device,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
    )


@dataclass
class MergePlan:
    """What `plan_merge` worked out about a merge's inputs.

    * `reference`: the state dict whose keys, order, dtypes and ties the output follows (the base, else model 0).
    * `keys`: every key, in the reference's order.
    * `merge_keys`: the keys a method merges: floating, not excluded, first of their tie group.
    * `copy_keys`: keys copied from the reference unchanged (non-floating or excluded).
    * `aliases`: tied duplicate key -> the merge (or copy) key it repeats.
    * `names`: a readable name per model for error messages.
    """

    reference: StateDict
    keys: list[str]
    merge_keys: list[str]
    copy_keys: list[str]
    aliases: dict[str, str] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)

    def finish(self, merged: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Assemble the output: merged tensors cast to the reference dtypes, copies, and the ties restored."""
        out: dict[str, torch.Tensor] = {}
        for key in self.keys:
            if key in self.aliases:
                continue
            ref = self.reference[key]
            if key in merged:
                value = merged[key].to(dtype=ref.dtype)
                # never hand back an input tensor: a later in-place edit of the output must not reach the input
                out[key] = value.clone() if _shares_memory(value, ref) else value
            else:
                out[key] = ref.detach().clone()
        for key in self.keys:
            if key in self.aliases:
                out[key] = out[self.aliases[key]]
        return {key: out[key] for key in self.keys}


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device or a.device.type == "meta":
        return False
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def plan_merge(
    base: StateDict | None,
    models: Sequence[StateDict],
    *,
    needs_base: bool,
    exclude: Sequence[str] = (),
    names: Sequence[str] | None = None,
    method: str = "merge",
) -> MergePlan:
    """Check a merge's inputs (see the module docstring) and sort its keys into merged, copied and tied ones."""
    if isinstance(models, Mapping) or not isinstance(models, Sequence) or isinstance(models, (str, bytes)):
        raise TypeError(
            f"{method}: models must be a sequence (list or tuple) of state dicts, got {type(models).__name__}; "
            "for a name -> state dict mapping use `run(pool)`"
        )
    if len(models) == 0:
        raise ValueError(f"{method}: models must hold at least one state dict, got none")
    if needs_base and base is None:
        raise ValueError(f"{method} needs a base state dict (task vectors are models minus base), got base=None")
    names = list(names) if names is not None else [f"models[{i}]" for i in range(len(models))]
    if len(names) != len(models):
        raise ValueError(f"{method}: got {len(names)} names for {len(models)} models")
    if isinstance(exclude, str):
        exclude = (exclude,)
    patterns = []
    for pattern in exclude:
        try:
            patterns.append(re.compile(pattern))
        except (re.error, TypeError) as error:
            raise ValueError(f"{method}: exclude pattern {pattern!r} is not a valid regex ({error})") from None
    if base is not None:
        _check_mapping(base, "base")
    for name, model in zip(names, models):
        _check_mapping(model, name)
    reference, reference_name = (base, "base") if base is not None else (models[0], names[0])
    others = list(zip(names, models)) if base is not None else list(zip(names[1:], models[1:]))
    for name, model in others:
        check_compatible(reference, model, reference_name=reference_name, other_name=name)

    keys = list(reference)
    seen: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    merge_keys: list[str] = []
    copy_keys: list[str] = []
    for key in keys:
        tensor = reference[key]
        ident = _storage_id(tensor)
        if ident is not None and ident in seen:
            aliases[key] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = key
        if tensor.is_floating_point() and not any(p.search(key) for p in patterns):
            merge_keys.append(key)
        else:
            copy_keys.append(key)
    return MergePlan(
        reference=reference, keys=keys, merge_keys=merge_keys, copy_keys=copy_keys, aliases=aliases, names=names
    )


def per_model(name: str, value: Any, n_models: int, *, default: float | None = None) -> list[float]:
    """Expand a per-model parameter (`weight`, `density`, ...): None -> default, a number -> n copies, a list -> itself.

    Raises when a list has the wrong length or holds something that is not a finite number.
    """
    if value is None:
        if default is None:
            raise ValueError(f"{name} is required (a number, or one number per model)")
        return [float(default)] * n_models
    if _is_number(value):
        values = [float(value)] * n_models
    elif isinstance(value, torch.Tensor) and value.dim() <= 1:
        values = [float(v) for v in value.reshape(-1).tolist()]
        if value.dim() == 0:
            values = values * n_models
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if not all(_is_number(v) for v in value):
            raise TypeError(f"{name} must be a number or a list of numbers, got {value!r}")
        values = [float(v) for v in value]
    else:
        raise TypeError(f"{name} must be a number or a list of numbers (one per model), got {type(value).__name__}")
    if len(values) != n_models:
        raise ValueError(f"{name} has {len(values)} values but there are {n_models} models")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be finite, got {values}")
    return values


def check_fraction(name: str, values: Sequence[float], *, low_open: bool = False) -> None:
    """Every value in [0, 1] (or (0, 1] with `low_open`), else a ValueError naming the parameter."""
    for v in values:
        if not (0 < v <= 1 if low_open else 0 <= v <= 1):
            interval = "(0, 1]" if low_open else "[0, 1]"
            raise ValueError(f"{name} must be in {interval}, got {v!r}")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_number(name: str, value: Any) -> float:
    if not _is_number(value) or not math.isfinite(float(value)):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------------------------------------------
# State-dict arithmetic (FusionBench's state_dict_sub / add / mul)
# ----------------------------------------------------------------------------------------------------------------


def state_dict_sub(a: StateDict, b: StateDict) -> dict[str, torch.Tensor]:
    """`a - b` key by key for floating tensors (non-floating ones are taken from `a`); keys/shapes/dtypes must match."""
    _check_mapping(a, "a")
    _check_mapping(b, "b")
    check_compatible(a, b, reference_name="a", other_name="b")
    return {k: (v - b[k]) if v.is_floating_point() else v.clone() for k, v in a.items()}


def state_dict_add(a: StateDict, b: StateDict) -> dict[str, torch.Tensor]:
    """`a + b` key by key for floating tensors (non-floating ones are taken from `a`); keys/shapes/dtypes must match."""
    _check_mapping(a, "a")
    _check_mapping(b, "b")
    check_compatible(a, b, reference_name="a", other_name="b")
    return {k: (v + b[k]) if v.is_floating_point() else v.clone() for k, v in a.items()}


def state_dict_mul(a: StateDict, scalar: float) -> dict[str, torch.Tensor]:
    """`scalar * a` for floating tensors (non-floating ones copied)."""
    _check_mapping(a, "a")
    scalar = check_number("scalar", scalar)
    return {k: (v * scalar) if v.is_floating_point() else v.clone() for k, v in a.items()}


def task_vectors(base: StateDict, models: Sequence[StateDict]) -> list[dict[str, torch.Tensor]]:
    """Task vectors τ_t = θ_t − θ_0 (Ilharco et al. 2023), one state dict per model.

    Floating, untied keys only (a tied duplicate appears once, under its first key), in at least float32.
    """
    plan = plan_merge(base, models, needs_base=True, method="task_vectors")
    out = []
    for model in models:
        vector = {}
        for key in plan.merge_keys:
            dtype = compute_dtype(base[key].dtype)
            # τ_t = θ_t − θ_0
            vector[key] = model[key].to(dtype) - base[key].to(dtype)
        out.append(vector)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodInfo:
    """What the registry knows about a merge method.

    * `name`: the registry name (mergekit's where mergekit has the method).
    * `fn`: the function.
    * `needs_base`: whether it works on task vectors and so needs `base`.
    * `in_mergekit`: whether mergekit has a method of this name (`to_mergekit_yaml` says so when not).
    * `reference`: the paper.
    * `per_model`: parameters that take one value per model (mergekit's "tensor parameters").
    """

    name: str
    fn: MergeFn
    needs_base: bool
    in_mergekit: bool
    reference: str
    per_model: tuple[str, ...] = ()


MERGE_METHODS: dict[str, MergeFn] = {}
METHOD_INFO: dict[str, MethodInfo] = {}

# other libraries' names for lablib's parameters: mergekit YAML writes `lambda`, FusionBench `scaling_factor`
PARAMETER_ALIASES: dict[str, str] = {"lambda": "lambda_", "scaling_factor": "lambda_"}


def merge_method(
    name: str, *, needs_base: bool, reference: str, in_mergekit: bool = False, per_model: Sequence[str] = ()
) -> Callable[[MergeFn], MergeFn]:
    """Register `fn(base, models, /, *, ...) -> dict` under `name` (mergekit's `@merge_method`, for state dicts).

    A student's method in one cell:

        @merge_method("my_mean", needs_base=False, reference="mine")
        def my_mean(base, models, /, *, exclude=()):
            plan = plan_merge(base, models, needs_base=False, exclude=exclude, method="my_mean")
            return plan.finish({k: sum(m[k].float() for m in models) / len(models) for k in plan.merge_keys})
    """
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"a merge method name must be snake_case, got {name!r}")

    def register(fn: MergeFn) -> MergeFn:
        if name in MERGE_METHODS and MERGE_METHODS[name] is not fn:
            raise ValueError(f"merge method {name!r} is already registered")
        MERGE_METHODS[name] = fn
        METHOD_INFO[name] = MethodInfo(
            name=name, fn=fn, needs_base=needs_base, in_mergekit=in_mergekit, reference=reference,
            per_model=tuple(per_model),
        )
        return fn

    return register


def method_parameters(method: str) -> dict[str, Any]:
    """A method's keyword parameters and their defaults (`inspect.Parameter.empty` for required ones)."""
    _lookup(method)
    signature = inspect.signature(MERGE_METHODS[method])
    return {
        p.name: p.default for p in signature.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def _lookup(method: str) -> MergeFn:
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose one of {sorted(MERGE_METHODS)}")
    return MERGE_METHODS[method]


def canonical_params(method: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Rename aliases (`lambda`, `scaling_factor` -> `lambda_`) and reject parameters `method` does not take."""
    allowed = method_parameters(method)
    out: dict[str, Any] = {}
    for name, value in params.items():
        target = PARAMETER_ALIASES.get(name, name)
        if target in out:
            raise TypeError(f"{method}: {target!r} given twice (as {name!r} and as another alias)")
        if target not in allowed:
            raise TypeError(f"{method} takes no parameter {name!r}; its parameters are {sorted(allowed)}")
        out[target] = value
    return out


def merge(
    method: str, base: StateDict | None, models: Sequence[StateDict], /, **params: Any
) -> dict[str, torch.Tensor]:
    """Merge `models` (over `base`) with the registered `method`; `params` are the method's keyword parameters.

    `lambda` and FusionBench's `scaling_factor` are accepted as aliases of `lambda_`. Returns a new state dict with
    the base's (or first model's) keys, order and dtypes.
    """
    fn = _lookup(method)
    return fn(base, models, **canonical_params(method, params))
