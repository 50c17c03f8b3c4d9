"""Masks as first-class objects: `Mask`, its statistics, applying / attaching / removing it, and the masked ledger.

A **mask** maps parameter names to boolean tensors of the parameters' shapes: `True` = keep, `False` = pruned. Its
**density** is the kept fraction (sparsity = 1 - density), per tensor and over all of them.

Three ways to use a mask on a model, by what they do to the model you pass:

| call | the model you pass | the weights afterwards | reversible |
|---|---|---|---|
| `mask.apply(model)` | untouched; a masked deep copy is returned | plain parameters, pruned entries are 0 | n/a |
| `mask.apply_(model)` | changed in place | plain parameters, pruned entries are 0 | no |
| `mask.attach_(model)` | changed in place | `W_eff = W ⊙ m` computed in every forward | `mask.remove_(model)` |

`attach_` uses `torch.nn.utils.parametrize`: the dense weight `W` stays stored (as
`<module>.parametrizations.<name>.original`) and every access to `module.weight` returns `W ⊙ m`. This is also how
masked training keeps zeros at zero: **attach, then call `lablib.train.train` as usual**. The effective weight is
recomputed from the mask in every forward, so no optimizer step, momentum or weight decay can revive a pruned entry
(the gradient reaching `W` is `m ⊙ ∂L/∂W_eff`, exactly 0 on pruned entries). `remove_(model, bake=True)` then writes
`W ⊙ m` back as a plain parameter; `bake=False` puts the stored dense `W` back ("restore"): the kept entries as
trained, the pruned entries as they were when the mask was attached (AdamW's decoupled weight decay, if you asked for
any, also shrinks them). `masked_train` wraps attach -> train -> bake on a copy.

Parameter names are *canonical*: the names `model.named_parameters()` gives on the plain model
(`blocks.0.ffn.fc.weight`), also while a mask is attached, and a tensor tied to several modules (a tied embedding /
LM head) has one name, the first. Attaching to a tied tensor masks it in every module that uses it. Removing a
parametrization puts the parameter back in its place, so `state_dict()` keys keep their order.

`masked_ledger(model, mask)` is `lablib.ledger.ledger` with the pruned entries taken out: `stored` and
`active_per_token` count nonzero values only (the mask's index bits are not counted; the notes give them), `trainable`
drops pruned entries, and `flops_per_token` drops 2 FLOPs per pruned `nn.Linear` weight (counted once per module).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from lablib import ledger as ledger_module
from lablib.ledger import ParamLedger

__all__ = [
    "SCOPES",
    "Mask",
    "MaskStats",
    "MaskResult",
    "SparseTrainResult",
    "attached_mask",
    "global_top_k",
    "kept_count",
    "mask_from_scores",
    "masked_ledger",
    "masked_train",
    "norm_and_bias_names",
    "parameter_names",
    "prunable_names",
]

# how `mask_from_scores` compares scores: within each tensor, across all tensors, or within each output row
SCOPES = ("layer", "global", "row")
_MASK_FORMAT = "lablib.sparse.Mask"
_ORDER_KEY = "_lablib_sparse_parameter_order"
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)


# ----------------------------------------------------------------------------------------------------------------
# Validators (one clear message per kind of bad input)
# ----------------------------------------------------------------------------------------------------------------


def check_density(density: Any, *, name: str = "density", allow_zero: bool = False) -> float:
    """`density` as a float, or a ValueError naming the allowed interval ((0, 1], or [0, 1] with `allow_zero`)."""
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"{name} must be a number (the kept fraction), got {type(density).__name__}")
    low_ok = density >= 0 if allow_zero else density > 0
    if not (math.isfinite(density) and low_ok and density <= 1):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must be in {interval} (the kept fraction; sparsity = 1 - density), got {density!r}")
    return float(density)


def check_int(value: Any, *, name: str, low: int = 1) -> int:
    """`value` as an int >= `low`, or a TypeError/ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value}")
    return value


def kept_count(*, density: float, numel: int) -> int:
    """How many of `numel` entries a `density` keeps: ⌈density · numel⌉, so ⌊(1 - density) · numel⌋ are pruned.

    A tolerance of 1e-9 absorbs float noise (0.7 * 10 = 7.000000000000001 keeps 7, not 8).
    """
    # k = ⌈d · n⌉  (pruned = n - k = ⌊(1 - d) · n⌋)
    return min(numel, max(0, math.ceil(density * numel - 1e-9)))


# ----------------------------------------------------------------------------------------------------------------
# Canonical parameter names (stable while masks are attached; tied tensors named once)
# ----------------------------------------------------------------------------------------------------------------

Slot = tuple[nn.Module, str]


def _slots(model: nn.Module) -> dict[str, list[Slot]]:
    """canonical name -> every (module, attribute) that holds that parameter, in `named_modules` order.

    A parametrized tensor is listed under its plain name (`fc.weight`, not `fc.parametrizations.weight.original`) and
    the parametrization modules themselves (and whatever parameters they own) are skipped.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    skip: set[int] = set()
    first_name: dict[int, str] = {}
    slots: dict[str, list[Slot]] = {}

    def add(key: int, name: str, slot: Slot) -> None:
        if key in first_name:
            slots[first_name[key]].append(slot)
        else:
            first_name[key] = name
            slots[name] = [slot]

    for module_name, module in model.named_modules():
        if id(module) in skip:
            continue
        prefix = f"{module_name}." if module_name else ""
        if parametrize.is_parametrized(module):
            skip.update(id(sub) for sub in module.parametrizations.modules())
            for tensor_name, plist in module.parametrizations.items():
                original = getattr(plist, "original", None)
                if original is None:
                    raise ValueError(f"{prefix}{tensor_name} has a multi-tensor parametrization; lablib.sparse cannot "
                                     "name it (remove that parametrization first)")
                add(id(original), prefix + tensor_name, (module, tensor_name))
        for param_name, param in module._parameters.items():
            if param is not None:
                add(id(param), prefix + param_name, (module, param_name))
    return slots


def parameter_names(model: nn.Module) -> list[str]:
    """Canonical parameter names of `model` (see the module docstring), in `named_parameters` order."""
    return list(_slots(model))


def prunable_names(model: nn.Module) -> list[str]:
    """The default tensors to prune: the weight of every `nn.Linear`, except an LM head.

    Excluded (the convention of the pruning papers): biases, norms, embeddings, a module named `lm_head`, and any
    Linear weight tied to an `nn.Embedding` (a tied head). Pass `names=` to any function to choose others.
    """
    paths = {id(module): path for path, module in model.named_modules()}
    chosen = []
    for name, holders in _slots(model).items():
        linear = [mod for mod, attr in holders if isinstance(mod, nn.Linear) and attr == "weight"]
        if not linear or any(isinstance(mod, nn.Embedding) for mod, _ in holders):
            continue
        if any(paths.get(id(mod), "").split(".")[-1] == "lm_head" for mod in linear):
            continue
        chosen.append(name)
    return chosen


def _module_path(model: nn.Module, target: nn.Module) -> str:
    for path, module in model.named_modules():
        if module is target:
            return path
    return ""


def _resolve_names(model: nn.Module, names: Iterable[str] | None, *, default: Callable[[nn.Module], list[str]]
                   ) -> list[str]:
    """`names` checked against the model (KeyError naming unknown ones), or `default(model)` when None."""
    slots = _slots(model)
    if names is None:
        chosen = default(model)
        if not chosen:
            raise ValueError(f"{type(model).__name__} has no prunable tensors (nn.Linear weights); pass names=")
        return chosen
    if isinstance(names, str):
        raise TypeError(f"names must be a list of parameter names, got the single string {names!r}")
    chosen = list(dict.fromkeys(names))
    unknown = [n for n in chosen if n not in slots]
    if unknown:
        raise KeyError(_unknown_message(unknown, list(slots)))
    if not chosen:
        raise ValueError("names is empty; nothing to mask")
    return chosen


def _unknown_message(unknown: Sequence[str], known: Sequence[str]) -> str:
    preview = ", ".join(known[:8]) + (", ..." if len(known) > 8 else "")
    return f"unknown parameter names {list(unknown)}; the model's parameters are: {preview}"


def _value(model: nn.Module, name: str, slots: dict[str, list[Slot]] | None = None) -> torch.Tensor:
    """The tensor the model computes with under `name` (W ⊙ m while a mask is attached)."""
    module, attr = (slots or _slots(model))[name][0]
    return getattr(module, attr)


def _storage(model: nn.Module, name: str, slots: dict[str, list[Slot]] | None = None) -> nn.Parameter:
    """The stored parameter under `name` (the dense `original` while a parametrization is attached)."""
    module, attr = (slots or _slots(model))[name][0]
    if parametrize.is_parametrized(module, attr):
        return module.parametrizations[attr].original
    return module._parameters[attr]


# ----------------------------------------------------------------------------------------------------------------
# Parametrizations: register one on every module holding a (possibly tied) tensor; remove and optionally bake
# ----------------------------------------------------------------------------------------------------------------


class MaskParametrization(nn.Module):
    """`W -> W ⊙ m` for `torch.nn.utils.parametrize` (the mask is a non-persistent buffer, so it is not counted
    as stored by `lablib.ledger` nor written into `state_dict`; save the `Mask` itself)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # W_eff = W ⊙ m  (masked_fill, not a product, so a NaN/inf under a pruned entry still gives 0)
        return weight.masked_fill(~self.mask, 0)


def _register(model: nn.Module, name: str, parametrization: nn.Module, slots: dict[str, list[Slot]]) -> None:
    for module, attr in slots[name]:
        if parametrize.is_parametrized(module, attr):
            raise ValueError(f"{name} already has a parametrization ({type(module.parametrizations[attr][0]).__name__}"
                             "); remove it first (Mask.remove_ for a mask)")
    for module, attr in slots[name]:
        # remember where the tensor sat among the module's parameters, so removing the parametrization can put it
        # back there (state_dict and named_parameters keep their order)
        module.__dict__.setdefault(_ORDER_KEY, list(module._parameters))
        # unsafe=True: the parametrization keeps shape and dtype, so torch's consistency check is not needed
        parametrize.register_parametrization(module, attr, parametrization, unsafe=True)


def _unregister(model: nn.Module, name: str, slots: dict[str, list[Slot]], *, bake: bool) -> None:
    """Remove the parametrization of `name` from every module holding it. `bake=True` stores its current output as
    the plain parameter; `bake=False` restores the stored original. The value is computed once (a tied tensor must not
    be transformed twice) and the parameter object, its `requires_grad` and its ties are kept."""
    module, attr = slots[name][0]
    original = module.parametrizations[attr].original
    value = getattr(module, attr).detach().clone() if bake else None
    for holder, holder_attr in slots[name]:
        parametrize.remove_parametrizations(holder, holder_attr, leave_parametrized=False)
        order = holder.__dict__.get(_ORDER_KEY)
        if not parametrize.is_parametrized(holder):
            holder.__dict__.pop(_ORDER_KEY, None)
        if order is not None:
            items = dict(holder._parameters)
            ranked = [k for k in order if k in items] + [k for k in items if k not in order]
            holder._parameters.clear()
            holder._parameters.update((k, items[k]) for k in ranked)
    if value is not None:
        with torch.no_grad():
            original.copy_(value)


def _parametrization_of(model: nn.Module, name: str, slots: dict[str, list[Slot]]) -> nn.Module | None:
    module, attr = slots[name][0]
    if not parametrize.is_parametrized(module, attr):
        return None
    return module.parametrizations[attr][0]


# ----------------------------------------------------------------------------------------------------------------
# Mask
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskStats:
    """Density diagnostics of a mask: per tensor (`density`, `kept`, `numel`) and over all tensors."""

    density: dict[str, float]
    kept: dict[str, int]
    numel: dict[str, int]
    overall_density: float
    total_kept: int
    total_numel: int

    @property
    def sparsity(self) -> float:
        """1 - overall_density."""
        return 1.0 - self.overall_density

    def rows(self) -> list[dict[str, Any]]:
        """One plain dict per tensor (`name`, `kept`, `numel`, `density`), for tables and plots."""
        return [{"name": n, "kept": self.kept[n], "numel": self.numel[n], "density": self.density[n]}
                for n in self.density]


class Mask(Mapping[str, torch.Tensor]):
    """An immutable mapping `parameter name -> bool tensor` (True = keep); see the module docstring.

    Build one from a dict of boolean (or 0/1) tensors, from scores (`mask_from_scores`), from a pruning function, or
    `Mask.ones(model)` / `Mask.from_nonzero(model)`. The tensors are copied in and must not be modified through
    `mask[name]`. Two masks are equal when they have the same names and equal tensors.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if not isinstance(tensors, Mapping):
            raise TypeError(f"Mask needs a mapping name -> bool tensor, got {type(tensors).__name__}")
        data: dict[str, torch.Tensor] = {}
        for name, tensor in tensors.items():
            if not isinstance(name, str):
                raise TypeError(f"Mask keys must be parameter names (str), got {name!r}")
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"mask[{name!r}] must be a tensor, got {type(tensor).__name__}")
            if tensor.dtype != torch.bool:
                if tensor.is_complex() or bool(((tensor != 0) & (tensor != 1)).any()):
                    raise ValueError(f"mask[{name!r}] must be boolean or hold only 0/1, got dtype {tensor.dtype} "
                                     "with other values")
                tensor = tensor != 0
            data[name] = tensor.detach().clone()
        self._masks = data

    # --- mapping protocol -------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._masks[name]
        except KeyError:
            raise KeyError(f"the mask has no tensor {name!r}; it has {list(self._masks)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mask):
            return NotImplemented
        return set(self) == set(other) and all(torch.equal(self[n], other[n].to(self[n].device)) for n in self)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        if not self._masks:
            return "Mask({})"
        kept, total = self.total_kept(), self.total_numel()
        return f"Mask({len(self)} tensors, density {self.density:.4f}, {kept:,}/{total:,} kept)"

    def __and__(self, other: Mask) -> Mask:
        """Keep an entry only where both masks keep it (the masks must name the same tensors)."""
        self._check_same_names(other, "&")
        return Mask({n: self[n] & other[n].to(self[n].device) for n in self})

    def __or__(self, other: Mask) -> Mask:
        """Keep an entry where either mask keeps it (the masks must name the same tensors)."""
        self._check_same_names(other, "|")
        return Mask({n: self[n] | other[n].to(self[n].device) for n in self})

    def _check_same_names(self, other: Any, op: str) -> None:
        if not isinstance(other, Mask):
            raise TypeError(f"Mask {op} needs another Mask, got {type(other).__name__}")
        if set(self) != set(other):
            raise KeyError(f"Mask {op} needs masks over the same tensors; only in one: "
                           f"{sorted(set(self) ^ set(other))}")

    # --- statistics -------------------------------------------------------------------------------------------
    def kept(self) -> dict[str, int]:
        """Kept entries per tensor."""
        return {n: int(t.sum()) for n, t in self._masks.items()}

    def total_kept(self) -> int:
        """Kept entries over all tensors."""
        return sum(self.kept().values())

    def total_numel(self) -> int:
        """Entries over all tensors."""
        return sum(t.numel() for t in self._masks.values())

    def densities(self) -> dict[str, float]:
        """Kept fraction per tensor."""
        return {n: int(t.sum()) / t.numel() if t.numel() else 1.0 for n, t in self._masks.items()}

    @property
    def density(self) -> float:
        """Kept fraction over all tensors (1.0 for an empty mask)."""
        total = self.total_numel()
        return self.total_kept() / total if total else 1.0

    def stats(self) -> MaskStats:
        """Per-tensor and overall density, kept and total counts."""
        kept = self.kept()
        numel = {n: t.numel() for n, t in self._masks.items()}
        total_kept, total_numel = sum(kept.values()), sum(numel.values())
        return MaskStats(
            density={n: kept[n] / numel[n] if numel[n] else 1.0 for n in kept},
            kept=kept,
            numel=numel,
            overall_density=total_kept / total_numel if total_numel else 1.0,
            total_kept=total_kept,
            total_numel=total_numel,
        )

    # --- construction -----------------------------------------------------------------------------------------
    @classmethod
    def ones(cls, model: nn.Module, *, names: Iterable[str] | None = None) -> Mask:
        """Keep everything in `names` (default `prunable_names(model)`)."""
        slots = _slots(model)
        chosen = _resolve_names(model, names, default=prunable_names)
        return cls({n: torch.ones_like(_value(model, n, slots), dtype=torch.bool) for n in chosen})

    @classmethod
    def from_nonzero(cls, model: nn.Module, *, names: Iterable[str] | None = None) -> Mask:
        """The nonzero pattern of the model's current tensors `names` (default `prunable_names(model)`)."""
        slots = _slots(model)
        chosen = _resolve_names(model, names, default=prunable_names)
        return cls({n: _value(model, n, slots).detach() != 0 for n in chosen})

    def to(self, device: torch.device | str) -> Mask:
        """A copy with every tensor on `device`."""
        return Mask({n: t.to(device) for n, t in self._masks.items()})

    # --- checking against a model -----------------------------------------------------------------------------
    def check(self, model: nn.Module) -> None:
        """Raise KeyError for names the model lacks and ValueError for shape mismatches (naming both shapes)."""
        slots = _slots(model)
        unknown = [n for n in self if n not in slots]
        if unknown:
            raise KeyError(_unknown_message(unknown, list(slots)))
        for name, tensor in self._masks.items():
            shape = tuple(_value(model, name, slots).shape)
            if tuple(tensor.shape) != shape:
                raise ValueError(f"mask[{name!r}] has shape {tuple(tensor.shape)} but the parameter has shape {shape}")

    # --- using it ---------------------------------------------------------------------------------------------
    def apply(self, model: nn.Module) -> nn.Module:
        """A deep copy of `model` whose masked tensors have their pruned entries set to 0; `model` is untouched."""
        self.check(model)
        return self.apply_(copy.deepcopy(model))

    def apply_(self, model: nn.Module) -> nn.Module:
        """Set the pruned entries of `model`'s tensors to 0 **in place** (irreversibly); returns `model`."""
        self.check(model)
        slots = _slots(model)
        with torch.no_grad():
            for name, tensor in self._masks.items():
                stored = _storage(model, name, slots)
                stored.masked_fill_(~tensor.to(stored.device), 0)
        return model

    def apply_to_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A new dict: masked copies for the mask's names, the other entries as they are (same tensor objects)."""
        unknown = [n for n in self if n not in state_dict]
        if unknown:
            raise KeyError(_unknown_message(unknown, list(state_dict)))
        out = dict(state_dict)
        for name, tensor in self._masks.items():
            value = state_dict[name]
            if tuple(value.shape) != tuple(tensor.shape):
                raise ValueError(f"mask[{name!r}] has shape {tuple(tensor.shape)} but the state dict's tensor has "
                                 f"shape {tuple(value.shape)}")
            out[name] = value.masked_fill(~tensor.to(value.device), 0)
        return out

    def attach_(self, model: nn.Module) -> nn.Module:
        """Attach the mask **in place**: from now on the model computes with `W ⊙ m` (see the module docstring);
        training keeps pruned entries at exactly 0. Undo with `remove_`. Returns `model`."""
        self.check(model)
        slots = _slots(model)
        for name in self:
            existing = _parametrization_of(model, name, slots)
            if existing is not None:
                raise ValueError(f"{name} already has a {type(existing).__name__} attached; call remove_ first")
        for name, tensor in self._masks.items():
            stored = _storage(model, name, slots)
            _register(model, name, MaskParametrization(tensor.to(stored.device)), slots)
        return model

    def remove_(self, model: nn.Module, *, bake: bool = False) -> nn.Module:
        """Take this mask off `model` **in place**. `bake=False` restores the stored dense weights; `bake=True`
        keeps the masked weights (pruned entries 0) as plain parameters. Returns `model`."""
        slots = _slots(model)
        unknown = [n for n in self if n not in slots]
        if unknown:
            raise KeyError(_unknown_message(unknown, list(slots)))
        for name in self:
            if not isinstance(_parametrization_of(model, name, slots), MaskParametrization):
                raise ValueError(f"{name} has no mask attached (attach one with Mask.attach_)")
        for name in self:
            _unregister(model, name, slots, bake=bake)
        return model

    # --- files ------------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the mask as a safetensors file of bool tensors (no pickle)."""
        from safetensors.torch import save_file

        tensors = {n: t.detach().cpu().contiguous() for n, t in self._masks.items()}
        save_file(tensors, os.fspath(path), metadata={"format": _MASK_FORMAT, "density": f"{self.density:.6f}"})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Mask:
        """Read a mask written by `save` (CPU tensors, names in the saved order)."""
        from safetensors import safe_open

        path = os.fspath(path)
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != _MASK_FORMAT:
                raise ValueError(f"{path} is not a lablib mask file (metadata format {metadata.get('format')!r}, "
                                 f"expected {_MASK_FORMAT!r})")
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        for name, tensor in tensors.items():
            if tensor.dtype != torch.bool:
                raise ValueError(f"{path}: tensor {name!r} has dtype {tensor.dtype}, expected torch.bool")
        return cls(tensors)


def attached_mask(model: nn.Module) -> Mask | None:
    """The mask currently attached to `model` (every `MaskParametrization`), or None when there is none."""
    slots = _slots(model)
    found = {}
    for name in slots:
        parametrization = _parametrization_of(model, name, slots)
        if isinstance(parametrization, MaskParametrization):
            found[name] = parametrization.mask
    return Mask(found) if found else None


# ----------------------------------------------------------------------------------------------------------------
# Masks from scores
# ----------------------------------------------------------------------------------------------------------------


def _check_scores(scores: Mapping[str, torch.Tensor]) -> None:
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError("scores must be a non-empty mapping name -> tensor")
    for name, score in scores.items():
        if not isinstance(score, torch.Tensor):
            raise TypeError(f"scores[{name!r}] must be a tensor, got {type(score).__name__}")
        if score.is_complex() or bool(torch.isnan(score).any()):
            raise ValueError(f"scores[{name!r}] must be real and free of NaN")


def _top_k_flat(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k largest entries of a 1-D tensor; ties go to the lower index (stable sort)."""
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k:
        order = torch.sort(flat, descending=True, stable=True).indices[:k]
        keep[order] = True
    return keep


def _top_k_rows(rows: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k largest entries of every row of a 2-D tensor; ties go to the lower column."""
    keep = torch.zeros_like(rows, dtype=torch.bool)
    if k:
        order = torch.sort(rows, dim=-1, descending=True, stable=True).indices[:, :k]
        keep.scatter_(-1, order, True)
    return keep


def mask_from_scores(scores: Mapping[str, torch.Tensor], *, density: float, scope: str = "layer") -> Mask:
    """Keep the highest-scoring entries: a `density` fraction per tensor (`scope="layer"`), over all tensors
    together (`"global"`), or within every output row (`"row"`: dimension 0 is the row, the rest flattened; Wanda's
    comparison group). Exactly k = ⌈density · n⌉ entries are kept per comparison group; ties go to the entry that
    comes first in row-major (and, for "global", mapping) order, so the result is deterministic.
    """
    density = check_density(density)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    _check_scores(scores)
    if scope == "layer":
        return Mask({n: _top_k_flat(s.reshape(-1), kept_count(density=density, numel=s.numel())).reshape(s.shape)
                     for n, s in scores.items()})
    if scope == "row":
        out = {}
        for name, score in scores.items():
            rows = score.reshape(score.shape[0], -1) if score.dim() >= 2 else score.reshape(1, -1)
            k = kept_count(density=density, numel=rows.shape[1])
            out[name] = _top_k_rows(rows, k).reshape(score.shape)
        return Mask(out)
    total = sum(s.numel() for s in scores.values())
    return global_top_k(scores, k=kept_count(density=density, numel=total))


def global_top_k(scores: Mapping[str, torch.Tensor], *, k: int) -> Mask:
    """Keep the k highest scores over all tensors together (one ranking over their concatenation in mapping order;
    ties go to the earlier tensor / entry). Scores may be -inf to exclude an entry while k allows."""
    _check_scores(scores)
    total = sum(s.numel() for s in scores.values())
    k = check_int(k, name="k", low=0)
    if k > total:
        raise ValueError(f"k={k} exceeds the {total} entries of the scored tensors")
    flat = torch.cat([s.detach().reshape(-1).to(device="cpu", dtype=torch.float64) for s in scores.values()])
    keep = _top_k_flat(flat, k)
    out, start = {}, 0
    for name, score in scores.items():
        out[name] = keep[start : start + score.numel()].reshape(score.shape).to(score.device)
        start += score.numel()
    return Mask(out)


# ----------------------------------------------------------------------------------------------------------------
# Results, the masked ledger, masked training
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class MaskResult:
    """What a mask-building function returns.

    * `mask`: the `Mask`; `stats`: its densities and kept counts (`mask.stats()`).
    * `method`: e.g. `"magnitude/layer"`, `"wanda/row"`, `"magnitude/2:4"`, `"fish"`.
    * `scores`: the importance each entry was ranked by (|W|, |W|·‖X_j‖, Fisher...), by name.
    * `ledger`: `masked_ledger(model, mask)`: what the model stores and computes once the mask is applied.
    """

    mask: Mask
    stats: MaskStats
    method: str
    scores: dict[str, torch.Tensor]
    ledger: ParamLedger | None = None


@dataclass
class SparseTrainResult:
    """What a masked / sparse training helper returns.

    * `model`: the trained copy (the model you passed is untouched), masks baked in as plain parameters.
    * `history`: `lablib.train.History` of the run.
    * `mask`: the sparsity mask the model obeys (for `sparse_finetune`: the mask of trained entries).
    * `stats`: `mask.stats()`.
    * `trainable`: how many scalar entries the run was allowed to change.
    * `ledger`: the trained model's ledger row, mask-aware, `trainable` set to the entries trained.
    """

    model: nn.Module
    history: Any
    mask: Mask
    stats: MaskStats
    trainable: int
    ledger: ParamLedger


def masked_ledger(model: nn.Module, mask: Mask | None = None, *, name: str | None = None,
                  seq_len: int | None = None) -> ParamLedger:
    """`lablib.ledger.ledger(model)` with the pruned entries of `mask` taken out (see the module docstring).

    `mask=None` uses the mask attached to the model (`attached_mask`); without one it raises ValueError (pass
    `mask=Mask.from_nonzero(model)` to count the zeros a baked model holds).
    """
    if mask is None:
        mask = attached_mask(model)
        if mask is None:
            raise ValueError("the model has no mask attached; pass mask= (Mask.from_nonzero(model) counts its zeros)")
    if not isinstance(mask, Mask):
        raise TypeError(f"mask must be a Mask, got {type(mask).__name__}")
    mask.check(model)
    base = ledger_module.ledger(model, name=name, seq_len=seq_len)
    slots = _slots(model)
    pruned = {n: t.numel() - int(t.sum()) for n, t in mask.items()}
    total_pruned = sum(pruned.values())
    trainable_pruned = sum(p for n, p in pruned.items() if _storage(model, n, slots).requires_grad)
    # one multiply-add (2 FLOPs) per token saved for every pruned weight of an nn.Linear
    linear_pruned = sum(p * sum(isinstance(mod, nn.Linear) and attr == "weight" for mod, attr in slots[n])
                        for n, p in pruned.items())
    note = (f"mask: density {mask.density:.4f} over {len(mask)} tensors, {total_pruned:,} pruned; stored counts "
            f"nonzero values (+{mask.total_numel():,} mask bits not counted)")
    return dataclasses.replace(
        base,
        active_per_token=max(0, base.active_per_token - total_pruned),
        stored=base.stored - total_pruned,
        trainable=base.trainable - trainable_pruned,
        flops_per_token=max(0, base.flops_per_token - 2 * linear_pruned),
        notes="; ".join(x for x in (base.notes, note) if x),
    )


def _fresh(batches: Any) -> Iterable[Any]:
    """A training phase's batches: `batches()` when it is callable (a factory), else `batches` itself."""
    return batches() if callable(batches) else batches


def masked_train(model: nn.Module, *, mask: Mask, batches: Any, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                 steps: int, **train_kwargs: Any) -> SparseTrainResult:
    """Train a copy of `model` with `mask` attached (pruned entries stay exactly 0), then bake the mask in.

    The callback-free pattern it wraps, usable directly: `mask.attach_(m); lablib.train.train(m, ...);
    mask.remove_(m, bake=True)`. `train_kwargs` go to `lablib.train.train` (`lr`, `seed`, `weight_decay`,
    `eval_fn`, `progress`...). `batches` may be an iterable or a zero-argument factory returning one.
    """
    from lablib.train import train

    if not isinstance(mask, Mask):
        raise TypeError(f"mask must be a Mask, got {type(mask).__name__}")
    mask.check(model)
    work = copy.deepcopy(model)
    mask.attach_(work)
    try:
        history = train(work, batches=_fresh(batches), loss_fn=loss_fn, steps=steps, **train_kwargs)
    finally:
        mask.remove_(work, bake=True)
    row = masked_ledger(work, mask)
    return SparseTrainResult(model=work, history=history, mask=mask, stats=mask.stats(), trainable=row.trainable,
                             ledger=row)


def norm_and_bias_names(model: nn.Module) -> list[str]:
    """Parameters of normalisation layers (LayerNorm, GroupNorm, BatchNorm, RMSNorm) and every bias: PERP's set."""
    rms = getattr(nn, "RMSNorm", None)
    norm_types = _NORM_TYPES + ((rms,) if rms is not None else ())
    chosen = []
    for name, holders in _slots(model).items():
        if any(isinstance(mod, norm_types) for mod, _ in holders) or any(attr == "bias" for _, attr in holders):
            chosen.append(name)
    return chosen
