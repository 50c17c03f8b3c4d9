"""Meeting the merging libraries halfway: mergekit YAML export and a FusionBench-style `run(pool)`.

* `to_mergekit_yaml(method, params, model_names, base_model=...)` writes any lablib merge as a mergekit config
  (`merge_method`, `base_model`, `models: [{model, parameters: {weight, density}}]`, `parameters: {lambda,
  normalize, rescale}`, `dtype`). What mergekit cannot express (a lablib-only method, an option with no mergekit
  equivalent, a convention under which mergekit computes something else) is written as `#` comments, so the file
  documents the merge honestly and a YAML parser still sees only mergekit's fields. No PyYAML needed.
* `ModelPool` (a name -> state dict mapping plus a base) and `MergeAlgorithm(method, **params).run(pool)`, the
  calling style of FusionBench (`TaskArithmeticAlgorithm(scaling_factor=0.3).run(pool)`); a plain dict with the
  base under `"_pretrained_"` works as a pool too, as in FusionBench.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lablib.merging.core import (
    METHOD_INFO,
    StateDict,
    canonical_params,
    merge,
    method_parameters,
    per_model,
    plan_merge,
)

__all__ = ["MERGEKIT_GLOBAL_PARAMETERS", "to_mergekit_yaml", "ModelPool", "MergeAlgorithm", "run", "PRETRAINED"]

# FusionBench's key for the base model in a plain-dict pool
PRETRAINED = "_pretrained_"
# lablib parameter -> mergekit's global parameter name
MERGEKIT_GLOBAL_PARAMETERS = {"lambda_": "lambda", "normalize": "normalize", "rescale": "rescale"}
_MERGEKIT_PER_MODEL = ("weight", "density")
# parameters that only steer lablib's bookkeeping, never the arithmetic mergekit would do
_SILENT = ("exclude",)


def _yaml_scalar(value: Any) -> str:
    """One YAML scalar that PyYAML (YAML 1.1) and mergekit read back as the same Python value."""
    if isinstance(value, torch.dtype):
        value = str(value).removeprefix("torch.")
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        text = repr(value)
        # YAML 1.1 floats need a dot: 1e-05 would read back as a string
        if "e" in text and "." not in text.split("e")[0]:
            mantissa, exponent = text.split("e")
            text = f"{mantissa}.0e{exponent}"
        return text
    if isinstance(value, str):
        # a JSON string is a valid YAML double-quoted scalar
        return json.dumps(value)
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as a YAML scalar")


def _comment_value(value: Any) -> str:
    if isinstance(value, Mapping) or (isinstance(value, Sequence) and value and isinstance(value[0], Mapping)):
        return f"<{len(value)} state dicts, not exportable>"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_comment_value(v) for v in value) + "]"
    try:
        return _yaml_scalar(value)
    except TypeError:
        return repr(value)


def _convention_notes(method: str, resolved: Mapping[str, Any], weights: list[float] | None) -> list[str]:
    """Where mergekit would compute something other than lablib did with these options."""
    if method not in ("ties", "dare_linear", "dare_ties"):
        return []
    from lablib.merging.methods import resolve_options

    keys = ("convention", "majority_sign_method", "normalize", "normalize_by", "elect_on", "zero_sign", "scope",
            "rescale", "rescale_norm")
    options = resolve_options(method, **{k: resolved[k] for k in keys if k in resolved})
    reference = resolve_options(method, convention="mergekit")
    notes = []
    uniform = weights is None or len(set(weights)) <= 1
    if options.consensus is not None:
        if options.elect_on != reference.elect_on and not uniform:
            notes.append(f"lablib elected signs on {options.elect_on} deltas; mergekit elects on weighted deltas")
        if options.normalize and options.normalize_by != "weight" and not uniform:
            notes.append("lablib divided by the count of agreeing models; mergekit's normalize divides by their "
                         "summed weights")
        if options.zero_sign != "positive":
            notes.append("lablib filled exact sign ties with the global majority; mergekit elects + for them")
        if options.consensus != "total":
            notes.append(f"lablib elected signs by {options.consensus}; mergekit's {method} elects by total mass")
    if options.sparsification == "magnitude" and options.scope != "per_tensor":
        notes.append("lablib trimmed over all tensors at once (the official TIES code); mergekit trims per tensor")
    if options.sparsification == "random" and options.rescale and options.rescale_norm != "l1":
        if resolved.get("q") is not None:
            notes.append("lablib rescaled kept deltas by 1/q (DAREx-q); mergekit has no such rescale")
        else:
            how = "by 1/density" if options.rescale_norm == "density" else f"to their {options.rescale_norm} norm"
            notes.append(f"lablib rescaled kept deltas {how}; current mergekit matches the L1 norm instead (equal "
                         "only in expectation)")
    if options.sparsification == "random":
        notes.append("random masks: mergekit draws its own, so the merged tensors will differ from lablib's")
    return notes


def to_mergekit_yaml(
    method: str,
    params: Mapping[str, Any] | None,
    model_names: Sequence[str],
    *,
    base_model: str | None = None,
    dtype: str | torch.dtype | None = None,
) -> str:
    """A mergekit YAML config for the lablib merge `merge(method, base, models, **params)`.

    * `model_names`: what to call each model (a Hugging Face id or a path), in the order of `models`.
    * `base_model`: the base's name; required by the methods that use a base, omitted for `linear` and `fisher`.
    * `dtype`: mergekit's output dtype, e.g. "bfloat16" (omitted when None).

    Per-model `weight` and `density` go under each model's `parameters` (expanded from a scalar or a list); `lambda_`,
    `normalize` and `rescale` under the global `parameters` as `lambda`, `normalize`, `rescale`, with the values
    lablib used (defaults and `convention` resolved). Everything else is written as comments, as is a note for every
    way mergekit would compute differently (see `lablib.merging.methods` for the conventions). mergekit knows
    `linear`, `task_arithmetic`, `ties`, `dare_linear` and `dare_ties`; for the lablib-only methods (`fisher`, `pcb`,
    `iso_c`, `iso_cts`, `darex_q`, `magnitude_prune`) the file says so in its first lines.
    """
    if method not in METHOD_INFO:
        raise ValueError(f"unknown merge method {method!r}; choose one of {sorted(METHOD_INFO)}")
    info = METHOD_INFO[method]
    params = canonical_params(method, params or {})
    if isinstance(model_names, str) or not isinstance(model_names, Sequence) or not model_names:
        raise ValueError(f"model_names must be a non-empty list of names, got {model_names!r}")
    if not all(isinstance(name, str) and name for name in model_names):
        raise TypeError(f"model_names must be non-empty strings, got {list(model_names)!r}")
    if info.needs_base and not base_model:
        raise ValueError(f"{method} merges task vectors, so the config needs base_model (the base's name)")
    defaults = method_parameters(method)
    resolved = {name: params.get(name, default) for name, default in defaults.items()}
    n_models = len(model_names)

    lines = [f"# written by lablib.merging.to_mergekit_yaml from merge({method!r}, ...)"]
    if not info.in_mergekit:
        lines.append(f"# NOTE: {method!r} is a lablib-only method ({info.reference}); mergekit has no merge_method of "
                     "this name, so this file documents the merge but will not run in mergekit")
    weights = None
    per_model_values: dict[str, list[float]] = {}
    for name in info.per_model:
        if name not in _MERGEKIT_PER_MODEL:
            continue
        value = resolved.get(name, inspect.Parameter.empty)
        if value is inspect.Parameter.empty:
            continue
        default = 1.0 if name == "weight" else None
        per_model_values[name] = per_model(name, value, n_models, default=default)
    weights = per_model_values.get("weight")
    for note in _convention_notes(method, resolved, weights):
        lines.append(f"# note: {note}")
    lablib_only = {
        name: value for name, value in resolved.items()
        if name not in MERGEKIT_GLOBAL_PARAMETERS and name not in per_model_values and name not in _SILENT
        and value is not inspect.Parameter.empty and (name in params or value is not None)
    }
    if lablib_only:
        lines.append("# lablib options with no mergekit field:")
        for name, value in lablib_only.items():
            lines.append(f"#   {name}: {_comment_value(value)}")
    if resolved.get("exclude"):
        patterns = _comment_value(list(resolved["exclude"]))
        lines.append(f"# lablib copied the keys matching these regexes from the base unmerged: {patterns}")

    lines.append(f"merge_method: {method}")
    if info.needs_base:
        lines.append(f"base_model: {_yaml_scalar(base_model)}")
    lines.append("models:")
    for index, name in enumerate(model_names):
        lines.append(f"  - model: {_yaml_scalar(name)}")
        if per_model_values:
            lines.append("    parameters:")
            for pname, values in per_model_values.items():
                lines.append(f"      {pname}: {_yaml_scalar(values[index])}")
    global_params = {}
    for name, yaml_name in MERGEKIT_GLOBAL_PARAMETERS.items():
        if name not in resolved or resolved[name] is inspect.Parameter.empty:
            continue
        value = resolved[name]
        if name == "normalize" and value is None:
            from lablib.merging.methods import resolve_options

            keys = ("convention", "normalize_by", "elect_on", "zero_sign", "scope", "rescale", "rescale_norm")
            value = resolve_options(method, **{k: resolved[k] for k in keys if k in resolved}).normalize
        global_params[yaml_name] = float(value) if name == "lambda_" else value
    if global_params:
        lines.append("parameters:")
        for name, value in global_params.items():
            lines.append(f"  {name}: {_yaml_scalar(value)}")
    if dtype is not None:
        lines.append(f"dtype: {_yaml_scalar(dtype if isinstance(dtype, torch.dtype) else str(dtype))}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# FusionBench style
# ----------------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class ModelPool(Mapping[str, StateDict]):
    """Named fine-tuned state dicts plus an optional base: a read-only mapping name -> state dict (the base excluded).

    `ModelPool.from_mapping({"_pretrained_": base, "task_a": a, ...})` reads FusionBench's plain-dict layout.
    """

    models: Mapping[str, StateDict]
    base: StateDict | None = None
    base_name: str = "base"
    _names: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.models, Mapping) or not self.models:
            raise ValueError("a ModelPool needs a non-empty mapping of name -> state dict")
        for name, state in self.models.items():
            if not isinstance(name, str):
                raise TypeError(f"model names must be strings, got {name!r}")
            if not isinstance(state, Mapping):
                raise TypeError(f"pool model {name!r} must be a state dict, got {type(state).__name__}")
        if self.base is not None and not isinstance(self.base, Mapping):
            raise TypeError(f"the pool's base must be a state dict or None, got {type(self.base).__name__}")
        self._names = list(self.models)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, StateDict], *, base_key: str = PRETRAINED) -> ModelPool:
        """A pool from FusionBench's plain dict: the base under `base_key` ("_pretrained_"), the rest by name."""
        if isinstance(mapping, ModelPool):
            return mapping
        if not isinstance(mapping, Mapping):
            raise TypeError(f"a pool must be a ModelPool or a mapping name -> state dict, got {type(mapping).__name__}")
        models = {name: state for name, state in mapping.items() if name != base_key}
        return cls(models=models, base=mapping.get(base_key), base_name=base_key)

    def __getitem__(self, name: str) -> StateDict:
        return self.models[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class MergeAlgorithm:
    """A merge method with its parameters bound, run on a pool: `MergeAlgorithm("ties", density=0.2).run(pool)`.

    FusionBench's `scaling_factor` is accepted for `lambda_`. `run` returns the merged state dict (load it with
    `model.load_state_dict(...)`); errors name the pool's models.
    """

    def __init__(self, method: str, **params: Any) -> None:
        if method not in METHOD_INFO:
            raise ValueError(f"unknown merge method {method!r}; choose one of {sorted(METHOD_INFO)}")
        self.method = method
        self.params = canonical_params(method, params)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={_comment_value(v)}" for k, v in self.params.items())
        return f"MergeAlgorithm({self.method!r}{', ' if args else ''}{args})"

    def run(self, pool: ModelPool | Mapping[str, StateDict]) -> dict[str, torch.Tensor]:
        pool = ModelPool.from_mapping(pool)
        names = list(pool)
        models = [pool[name] for name in names]
        # check up front so that errors carry the pool's names rather than models[i]
        plan_merge(pool.base, models, needs_base=METHOD_INFO[self.method].needs_base, names=names, method=self.method)
        return merge(self.method, pool.base, models, **self.params)

    def to_mergekit_yaml(self, pool: ModelPool | Mapping[str, StateDict], *, dtype: str | None = None) -> str:
        """The mergekit config of `run(pool)`, naming the models by their pool names."""
        pool = ModelPool.from_mapping(pool)
        return to_mergekit_yaml(self.method, self.params, list(pool), base_model=pool.base_name, dtype=dtype)


def run(pool: ModelPool | Mapping[str, StateDict], *, method: str, **params: Any) -> dict[str, torch.Tensor]:
    """`MergeAlgorithm(method, **params).run(pool)` in one call."""
    return MergeAlgorithm(method, **params).run(pool)
