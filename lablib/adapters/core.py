"""Attaching adapters to the `nn.Linear` layers of any model, merging them in and out, saving and counting them.

The contract every adapter kind in `lablib.adapters` follows (after PEFT's `BaseTuner` and `LoraLayer`, reimplemented):

    y = x W0ᵀ + b + Δ(x),        Δ(x) = x ΔWᵀ for a weight update ΔW (out × in) that the kind builds

**Target matching** (PEFT's rules, `match_modules`): `target_modules` as a *string* is a regular expression that must
match a module's whole dotted name (`re.fullmatch`); as a *list* of strings, an entry matches a name equal to it or
ending in `"." + entry` (so `"qkv"` matches `blocks.0.attn.qkv` but `"kv"` matches nothing). `exclude_modules` uses
the same rules and wins. Every matched module must be an `nn.Linear`; a pattern that matches nothing, or a match that is
not an `nn.Linear`, raises an error naming the pattern.

**Wrap, don't subclass.** Each matched `nn.Linear` is replaced in its parent by an `AdapterLinear` that keeps the
original module as `.base_layer` (same object, same parameters) and adds the adapter's own parameters next to it. Every
parameter of the model you adapt is frozen (`requires_grad=False`); only adapter parameters train. Parameters shared by
several layers (a VB-LoRA vector bank, MoS shard pools, Compacter's slow factors) live *once* on the `AdaptedModel`,
in `adapted.adapter_banks`; the layers hold plain references to them, so `state_dict()`, `parameters()` and the ledger
see each shared tensor once.

**What mutates.** As in `lablib.sparse`, nothing changes the model you pass unless the function's name ends in `_`:

| call | the model you pass |
|---|---|
| `attach_adapters(model, config)` | untouched; a deep copy is adapted and returned inside an `AdaptedModel` |
| `attach_adapters_(model, config)` | its matched Linears are swapped for wrappers and all its parameters frozen; the returned `AdaptedModel` wraps that same object |
| `merge_adapters_(adapted)` / `unmerge_adapters_(adapted)` | base weights become W0 + ΔW / go back to W0 (to float rounding) |
| `merge_and_unload(adapted)` | untouched; returns a plain model (a copy) with ΔW merged and the wrappers gone |
| `load_adapter_state_dict_(adapted, state)` | adapter parameters (and seeds) replaced |

Use the returned `AdaptedModel` for training and counting: it is the module that owns the shared banks (after
`attach_adapters_`, calling the original object still runs the adapters, but its `parameters()` miss the banks).

**Merging.** `merge_adapters_` adds ΔW to each base weight (in float32, cast back to the weight's dtype) and remembers
the ΔW it added, so `unmerge_adapters_` subtracts exactly that even if the adapter changed meanwhile. A merged layer
runs only its base layer; do not train while merged (a warning says so). Merging into a weight that another module
also uses (a tied LM head) raises, because it would change that module too.

**Ledger** (`lablib.ledger`'s `ledger_counts()` protocol): an `AdapterLinear` accounts for its whole subtree, the base
Linear included (so the model's row stays complete); a shared bank accounts for itself once. For adapters alone,
`adapter_ledger(adapted)`. The numbers:

* `total`: adapter parameters (frozen random bases are not parameters; NOLA's bases and MoS's routing are buffers
  regenerated from a seed);
* `trainable`: adapter parameters with `requires_grad`;
* `stored`: numbers you must save to reproduce the adapter given the base model, i.e. what `adapter_state_dict`
  holds minus the seeds: seeded bases and seeded routing count 0, seeds themselves are configuration (like `r`),
  and VB-LoRA with `save_only_topk_weights=True` stores k indices + k weights per sub-vector instead of its logits;
* `flops_per_token`: the unmerged adapter's extra forward FLOPs per token (2 per multiply-add; 0 once merged;
  composing the factors from banks or bases happens once per forward, not per token, and is not counted).

`adapter_state_dict(adapted)` returns exactly the adapter's tensors (keys as in `adapted.state_dict()`, seeds as 0-d
int64 tensors) and `load_adapter_state_dict_` puts them back; bases and routing tables are regenerated from the
loaded seeds, so a reloaded NOLA or MoS adapter is bit-identical.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lablib.ledger import LedgerCounts, ParamLedger

__all__ = [
    "CONFIG_KINDS",
    "AdaptedModel",
    "AdapterBuild",
    "AdapterConfig",
    "AdapterLinear",
    "BankUsage",
    "adapted_layers",
    "adapter_ledger",
    "adapter_state_dict",
    "attach_adapters",
    "attach_adapters_",
    "bank_usage",
    "config_from_dict",
    "derive_seed",
    "load_adapter_state_dict_",
    "match_modules",
    "merge_adapters_",
    "merge_and_unload",
    "unmerge_adapters_",
]

# kind name -> config class, filled by AdapterConfig.__init_subclass__
CONFIG_KINDS: dict[str, type[AdapterConfig]] = {}

# lablib hooks an AdaptedModel must never borrow from the model it wraps (the ledger and init walks look for them)
_NOT_FORWARDED = frozenset({"ledger_counts", "attention_flops_per_token", "init_weights", "flops_per_token"})


# ----------------------------------------------------------------------------------------------------------------
# Validators
# ----------------------------------------------------------------------------------------------------------------


def check_int(value: Any, *, name: str, low: int = 1) -> int:
    """`value` as an int >= `low`, or a TypeError / ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value}")
    return value


def check_float(value: Any, *, name: str, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> float:
    """`value` as a finite float in the stated range, or an error naming it and the range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    ok = math.isfinite(value)
    if low is not None:
        ok = ok and (value > low if low_open else value >= low)
    if high is not None:
        ok = ok and (value < high if high_open else value <= high)
    if not ok:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        span = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise ValueError(f"{name} must be a finite number in {span}, got {value!r}")
    return value


def check_bool(value: Any, *, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_seed(value: Any, *, name: str = "seed") -> int:
    """Seeds are ints in [0, 2**32), as in `lablib.train`."""
    check_int(value, name=name, low=0)
    if value >= 2**32:
        raise ValueError(f"{name} must be in [0, 2**32), got {value}")
    return value


def _check_pattern(value: Any, *, name: str, allow_none: bool) -> str | tuple[str, ...] | None:
    if value is None:
        if allow_none:
            return None
        raise TypeError(f"{name} is required: a regex string (full match) or a list of module names / suffixes")
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{name} must not be an empty string")
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"{name}={value!r} is not a valid regular expression: {err}") from None
        return value
    if isinstance(value, Sequence) or isinstance(value, (set, frozenset)):
        entries = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
        if not entries:
            raise ValueError(f"{name} must not be empty")
        for entry in entries:
            if not isinstance(entry, str) or not entry:
                raise TypeError(f"{name} entries must be non-empty strings, got {entry!r}")
        return tuple(entries)
    raise TypeError(f"{name} must be a regex string or a list of strings, got {type(value).__name__}")


def derive_seed(seed: int, name: str) -> int:
    """A per-layer seed from a config's `seed` and a layer's (or group's) name, the same on every process.

    `zlib.crc32` is stable across processes and platforms (Python's `hash()` of a str is salted per process).
    """
    # s_layer = (seed · 1000003 + crc32(name)) mod (2^63 − 1): fits an int64 buffer and torch.Generator
    return (seed * 1_000_003 + zlib.crc32(name.encode("utf-8"))) % (2**63 - 1)


def check_rank_fits(name: str, layer: nn.Linear, r: int, *, what: str = "r") -> None:
    """A rank-r update of an (out × in) weight needs r <= min(in, out): a larger r adds parameters, not rank."""
    limit = min(layer.in_features, layer.out_features)
    if r > limit:
        raise ValueError(
            f"{what}={r} is larger than layer {name!r} allows: its weight is {layer.out_features} x "
            f"{layer.in_features}, so the rank is at most min(in, out) = {limit}"
        )


def check_divisible(name: str, layer: nn.Linear, size: int, *, what: str) -> None:
    """in_features and out_features must both be multiples of `size` (a sub-vector / shard / block length)."""
    bad = [f"{label}={n}" for label, n in (("in", layer.in_features), ("out", layer.out_features)) if n % size]
    if bad:
        raise ValueError(
            f"layer {name!r} ({layer.out_features} x {layer.in_features}) cannot be split by {what}={size}: "
            f"{', '.join(bad)} not divisible by {size}"
        )


# ----------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class AdapterBuild:
    """What a config's `_build` returns: one wrapper per matched layer name, and the shared banks by name."""

    layers: dict[str, AdapterLinear]
    banks: dict[str, nn.Module] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """Fields every adapter kind shares (PEFT's names).

    * `target_modules`: a regex string (full match on the dotted module name) or a list of names / dotted suffixes.
    * `exclude_modules`: same rules; a module matched by both is excluded.
    * `r`: the adapter's rank (its meaning per kind is in the kind's docstring).
    * `dropout`: dropout on the adapter branch's input (training mode only).
    """

    kind: ClassVar[str] = ""

    target_modules: str | tuple[str, ...]
    exclude_modules: str | tuple[str, ...] | None = None
    r: int = 8
    dropout: float = 0.0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("kind"):
            CONFIG_KINDS[cls.kind] = cls

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules",
                           _check_pattern(self.target_modules, name="target_modules", allow_none=False))
        object.__setattr__(self, "exclude_modules",
                           _check_pattern(self.exclude_modules, name="exclude_modules", allow_none=True))
        check_int(self.r, name="r")
        object.__setattr__(self, "dropout",
                           check_float(self.dropout, name="dropout", low=0.0, high=1.0, high_open=True))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with `"kind"`; `config_from_dict` inverts it."""
        raw = asdict(self)
        for key, value in raw.items():
            if isinstance(value, tuple):
                raw[key] = list(value)
        return {"kind": self.kind, **raw}

    def _build(self, layers: Mapping[str, nn.Linear]) -> AdapterBuild:
        """Validate every matched layer and create the wrappers and shared banks (nothing is mutated yet)."""
        raise NotImplementedError(f"{type(self).__name__} does not build adapters; use a kind's config")


def config_from_dict(raw: Mapping[str, Any]) -> AdapterConfig:
    """Rebuild a config from `config.to_dict()` (the `"kind"` key picks the class)."""
    if not isinstance(raw, Mapping) or "kind" not in raw:
        raise ValueError("config_from_dict needs a mapping with a 'kind' key (from AdapterConfig.to_dict())")
    kind = raw["kind"]
    if kind not in CONFIG_KINDS:
        raise ValueError(f"unknown adapter kind {kind!r}; known kinds: {sorted(CONFIG_KINDS)}")
    cls = CONFIG_KINDS[kind]
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - names - {"kind"})
    if unknown:
        raise ValueError(f"{cls.__name__} has no fields {unknown}")
    return cls(**{k: v for k, v in raw.items() if k != "kind"})


# ----------------------------------------------------------------------------------------------------------------
# The wrapper
# ----------------------------------------------------------------------------------------------------------------


class AdapterLinear(nn.Module):
    """An `nn.Linear` plus an adapter: `y = base_layer(x) + Δ(x)`; the base layer is kept, not subclassed.

    Subclasses implement `factors()` -> (A (r × in), B (out × r)) for low-rank kinds, or override `delta_weight()`
    and `adapter_forward()` (Compacter). `scaling` multiplies Δ (α/r for LoRA-style kinds, 1 for VB-LoRA).
    """

    kind: ClassVar[str] = ""

    def __init__(self, *, base_layer: nn.Linear, layer_name: str, r: int, scaling: float, dropout: float) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"base_layer must be an nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.layer_name = layer_name
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.scaling = r, float(scaling)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.enabled = True
        self._warned_merged_training = False
        # the ΔW added by merge(), so unmerge() subtracts exactly that (not persisted: a state holds W0 + ΔW)
        self.register_buffer("merged_delta", None, persistent=False)
        object.__setattr__(self, "_shared", None)

    # -- shared banks: referenced, not registered (they live once on the AdaptedModel) --

    def _set_shared(self, module: nn.Module | None) -> None:
        object.__setattr__(self, "_shared", module)

    @property
    def shared(self) -> nn.Module | None:
        """The shared bank / pool / slow factors this layer reads (owned by the AdaptedModel), or None."""
        return self._shared

    def _factory(self) -> dict[str, Any]:
        weight = self.base_layer.weight
        return {"device": weight.device, "dtype": weight.dtype}

    # -- the update --

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r × in), B (out × r)), differentiable w.r.t. the adapter parameters."""
        raise NotImplementedError(f"{type(self).__name__} has no low-rank factors")

    def delta_weight(self) -> torch.Tensor:
        """ΔW (out × in) in the base weight's dtype, computed in float32 (differentiable)."""
        a, b = self.factors()
        # ΔW = s · B A : (out × r)(r × in) -> (out × in)
        delta = self.scaling * (b.float() @ a.float())
        return delta.to(self.base_layer.weight.dtype)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Δ(x) for x of shape (..., in) -> (..., out), without forming ΔW."""
        a, b = self.factors()
        h = self.dropout(x)
        # Δ(x) = s · dropout(x) Aᵀ Bᵀ : (..., in) -> (..., r) -> (..., out)
        return self.scaling * F.linear(F.linear(h, a), b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            if not self.enabled:
                # adapters disabled while merged: y = x (W0 + ΔW − ΔW)ᵀ + b
                weight = self.base_layer.weight - self.merged_delta.to(self.base_layer.weight.dtype)
                return F.linear(x, weight, self.base_layer.bias)
            if self.training and torch.is_grad_enabled() and not self._warned_merged_training:
                # one text for every layer, so Python shows it once
                warnings.warn("a merged adapter runs only its base layer, so its parameters get no gradient; "
                              "call unmerge_adapters_ before training", stacklevel=2)
                self._warned_merged_training = True
            return self.base_layer(x)
        # y = x W0ᵀ + b : (..., in) -> (..., out)
        y = self.base_layer(x)
        if not self.enabled:
            return y
        # y + Δ(x)
        return y + self.adapter_forward(x)

    # -- merge / unmerge --

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W0 + ΔW (float32 sum, cast back)."""
        if self.merged:
            raise ValueError(f"adapter {self.layer_name!r} is already merged; call unmerge_adapters_ first")
        delta = self.delta_weight().detach().float()
        weight = self.base_layer.weight
        # W = W0 + ΔW
        weight.copy_((weight.float() + delta).to(weight.dtype))
        self.merged_delta = delta
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W − ΔW with the ΔW that `merge` added."""
        if not self.merged:
            raise ValueError(f"adapter {self.layer_name!r} is not merged; nothing to unmerge")
        weight = self.base_layer.weight
        # W0 = (W0 + ΔW) − ΔW
        weight.copy_((weight.float() - self.merged_delta.float()).to(weight.dtype))
        self.merged_delta = None
        self.merged = False

    # -- parameters, state, ledger --

    def adapter_parameters(self) -> list[nn.Parameter]:
        """This layer's own adapter parameters (not the base layer's, not shared banks')."""
        seen: dict[int, nn.Parameter] = {}
        for name, param in self.named_parameters():
            if not name.startswith("base_layer."):
                seen.setdefault(id(param), param)
        return list(seen.values())

    def stored_numbers(self) -> int:
        """Numbers this layer's adapter must save (seeds and seeded bases excluded); default: its parameters."""
        return sum(p.numel() for p in self.adapter_parameters())

    def adapter_flops_per_token(self) -> int:
        """Extra forward FLOPs per token of the unmerged adapter (2 per multiply-add): x Aᵀ then (·) Bᵀ."""
        return 2 * self.r * (self.in_features + self.out_features)

    def adapter_counts(self) -> LedgerCounts:
        """The ledger's numbers for this layer's adapter alone (shared banks excluded: they count themselves)."""
        params = self.adapter_parameters()
        total = sum(p.numel() for p in params)
        return LedgerCounts(
            total=total,
            active_per_token=total,
            stored=self.stored_numbers(),
            flops_per_token=0 if self.merged else self.adapter_flops_per_token(),
            trainable=sum(p.numel() for p in params if p.requires_grad),
        )

    def ledger_counts(self) -> LedgerCounts:
        """`lablib.ledger` protocol: the base Linear (which this module owns) plus the adapter."""
        base = self.base_layer
        base_params = {id(p): p for p in base.parameters()}.values()
        base_total = sum(p.numel() for p in base_params)
        base_buffers = sum(b.numel() for n, b in base.named_buffers() if b is not None)
        adapter = self.adapter_counts()
        return LedgerCounts(
            total=base_total + adapter.total,
            active_per_token=base_total + adapter.active_per_token,
            stored=base_total + base_buffers + adapter.stored,
            # 2 FLOPs per multiply-add of the base weight, plus the adapter branch when unmerged
            flops_per_token=2 * base.weight.numel() + adapter.flops_per_token,
            trainable=sum(p.numel() for p in base_params if p.requires_grad) + adapter.trainable,
        )

    def adapter_state(self, prefix: str) -> dict[str, torch.Tensor]:
        """This layer's entries of `adapter_state_dict` (keys start with `prefix`)."""
        state = self.state_dict(prefix=prefix, keep_vars=False)
        skip = prefix + "base_layer."
        return {k: v.detach().clone() for k, v in state.items() if not k.startswith(skip)}

    def import_state(self, prefix: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Turn this layer's entries of an adapter state into `load_state_dict` entries (identity by default)."""
        return {k: v for k, v in state.items() if k.startswith(prefix)}

    def extra_repr(self) -> str:
        return (f"{self.layer_name!r}, in={self.in_features}, out={self.out_features}, r={self.r}, "
                f"scaling={self.scaling:g}, merged={self.merged}")


# ----------------------------------------------------------------------------------------------------------------
# Matching
# ----------------------------------------------------------------------------------------------------------------


def _matches(name: str, pattern: str | tuple[str, ...]) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == key or name.endswith("." + key) for key in pattern)


def _inside_wrapper(name: str, wrapper_names: Sequence[str]) -> bool:
    return any(name.startswith(w + ".") for w in wrapper_names)


def match_modules(
    model: nn.Module,
    target_modules: str | Sequence[str],
    exclude_modules: str | Sequence[str] | None = None,
) -> list[str]:
    """Dotted names of `model`'s submodules (of any type) that `target_modules` matches and `exclude_modules` does
    not, in `named_modules()` order (rules in the module docstring). The root and modules inside existing adapter
    wrappers are never matched."""
    target = _check_pattern(target_modules, name="target_modules", allow_none=False)
    exclude = _check_pattern(exclude_modules, name="exclude_modules", allow_none=True)
    wrappers = [n for n, m in model.named_modules() if isinstance(m, AdapterLinear)]
    names = []
    for name, _ in model.named_modules():
        if not name or _inside_wrapper(name, wrappers):
            continue
        if exclude is not None and _matches(name, exclude):
            continue
        if _matches(name, target):
            names.append(name)
    return names


def _target_linears(model: nn.Module, config: AdapterConfig) -> dict[str, nn.Linear]:
    names = match_modules(model, config.target_modules, config.exclude_modules)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        excluded = ""
        if config.exclude_modules is not None:
            before = match_modules(model, config.target_modules)
            if before:
                excluded = f" (it matched {before[:5]}, all removed by exclude_modules={config.exclude_modules!r})"
        shown = linears[:12] + (["..."] if len(linears) > 12 else [])
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no module of {type(model).__name__}{excluded}; "
            "a string is a regex that must match the whole dotted name, a list entry must equal a name or its "
            f"last dotted parts. The nn.Linear modules are: {shown}"
        )
    layers: dict[str, nn.Linear] = {}
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, AdapterLinear):
            raise TypeError(
                f"target_modules={config.target_modules!r} matched {name!r}, which already has a "
                f"{type(module).__name__} adapter; lablib attaches one adapter per layer (merge_and_unload first)"
            )
        if not isinstance(module, nn.Linear):
            raise TypeError(
                f"target_modules={config.target_modules!r} matched {name!r}, a {type(module).__name__}, but adapters "
                "attach to nn.Linear layers only; narrow the pattern (or use exclude_modules)"
            )
        layers[name] = module
    # a module reused at two places would be adapted at one only
    appearances: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        appearances.setdefault(id(module), []).append(name)
    for name, module in layers.items():
        places = appearances[id(module)]
        if len(places) > 1:
            raise ValueError(f"layer {name!r} is one module reused at {places}; wrapping one place would leave the "
                             "others unadapted, so adapters on reused modules are not supported")
    return layers


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


# ----------------------------------------------------------------------------------------------------------------
# The adapted model
# ----------------------------------------------------------------------------------------------------------------


class AdaptedModel(nn.Module):
    """A model whose matched Linears carry adapters, plus the banks the adapters share.

    * `base_model`: the adapted model (its matched `nn.Linear`s replaced by `AdapterLinear`s, its own parameters
      frozen); `forward` calls it with the same arguments.
    * `adapter_banks`: an `nn.ModuleDict` of the shared banks (empty for LoRA and NOLA).
    * `adapter_config`: the config used.

    Unknown public attributes are looked up on `base_model` (so `adapted.config.seq_len` works for a TinyTransformer,
    as PEFT's `PeftModel` forwards), except lablib's protocol hooks (`ledger_counts`, `init_weights`, ...).
    """

    def __init__(self, *, base_model: nn.Module, adapter_config: AdapterConfig,
                 banks: Mapping[str, nn.Module] | None = None,
                 base_requires_grad: Mapping[str, bool] | None = None) -> None:
        super().__init__()
        self.base_model = base_model
        self.adapter_banks = nn.ModuleDict(dict(banks or {}))
        self.adapter_config = adapter_config
        # requires_grad of the model's own parameters before attaching (restored by merge_and_unload)
        self.base_requires_grad = dict(base_requires_grad or {})

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name in _NOT_FORWARDED or name in ("base_model", "adapter_banks"):
                raise
            return getattr(self.base_model, name)

    @property
    def adapted_layers(self) -> dict[str, AdapterLinear]:
        """Wrapper modules by their name in `base_model` (e.g. `"blocks.0.attn.qkv"`)."""
        return adapted_layers(self.base_model)

    @contextmanager
    def disable_adapters(self) -> Iterator[AdaptedModel]:
        """Inside the block the model computes the base model's outputs (merged adapters are subtracted)."""
        layers = list(self.adapted_layers.values())
        before = [layer.enabled for layer in layers]
        for layer in layers:
            layer.enabled = False
        try:
            yield self
        finally:
            for layer, flag in zip(layers, before):
                layer.enabled = flag

    def extra_repr(self) -> str:
        return f"kind={self.adapter_config.kind!r}, layers={len(self.adapted_layers)}"


def _check_config(config: Any) -> AdapterConfig:
    if not isinstance(config, AdapterConfig) or type(config) is AdapterConfig:
        raise TypeError(f"config must be an adapter kind's config (LoraConfig, NolaConfig, ...), "
                        f"got {type(config).__name__}")
    return config


def attach_adapters_(model: nn.Module, config: AdapterConfig) -> AdaptedModel:
    """Adapt `model` **in place**: swap each matched `nn.Linear` for its kind's wrapper, freeze every parameter of
    `model`, and return an `AdaptedModel` around `model` that owns the shared banks.

    Everything is validated (patterns, layer types, ranks, divisibility) before anything changes, so an error leaves
    `model` as it was. Adapter parameters are initialised from torch's global RNG (seed it for reproducibility);
    seeded bases and routing come from `config.seed`.
    """
    config = _check_config(config)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, AdaptedModel):
        raise TypeError("model is already an AdaptedModel; lablib attaches one adapter per model "
                        "(merge_and_unload it first)")
    layers = _target_linears(model, config)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    build = config._build(layers)
    if set(build.layers) != set(layers):
        raise RuntimeError(f"{type(config).__name__}._build returned layers {sorted(build.layers)} for "
                           f"{sorted(layers)}")
    for param in model.parameters():
        param.requires_grad_(False)
    for name, wrapper in build.layers.items():
        # new modules start in training mode: take the wrapped layer's train/eval flag
        wrapper.train(layers[name].training)
        _set_submodule(model, name, wrapper)
    for bank in build.banks.values():
        bank.train(model.training)
    adapted = AdaptedModel(base_model=model, adapter_config=config, banks=build.banks,
                           base_requires_grad=requires_grad)
    adapted.training = model.training
    return adapted


def attach_adapters(model: nn.Module, config: AdapterConfig) -> AdaptedModel:
    """Adapt a deep copy of `model` (left untouched) and return it as an `AdaptedModel` (see `attach_adapters_`)."""
    config = _check_config(config)
    if isinstance(model, AdaptedModel):
        raise TypeError("model is already an AdaptedModel; lablib attaches one adapter per model "
                        "(merge_and_unload it first)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    # validate on the original first, so a bad pattern costs no copy
    _target_linears(model, config)
    return attach_adapters_(copy.deepcopy(model), config)


def adapted_layers(model: nn.Module) -> dict[str, AdapterLinear]:
    """Every `AdapterLinear` in `model` by dotted name (relative to `model`; for an `AdaptedModel`, to its
    `base_model`)."""
    root = model.base_model if isinstance(model, AdaptedModel) else model
    return {name: m for name, m in root.named_modules() if isinstance(m, AdapterLinear)}


def _require_layers(model: nn.Module, what: str) -> dict[str, AdapterLinear]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} takes an AdaptedModel (or a module holding adapters), got {type(model).__name__}")
    layers = adapted_layers(model)
    if not layers:
        raise ValueError(f"{what}: {type(model).__name__} has no adapter layers (attach_adapters first)")
    return layers


def _shared_banks(model: nn.Module, layers: Mapping[str, AdapterLinear]) -> list[tuple[str, nn.Module]]:
    """The banks by name: those registered on an AdaptedModel, then any a layer references that is not."""
    found: dict[int, tuple[str, nn.Module]] = {}
    if isinstance(model, AdaptedModel):
        for key, bank in model.adapter_banks.items():
            found[id(bank)] = (key, bank)
    for name, layer in layers.items():
        bank = layer.shared
        if bank is not None and id(bank) not in found:
            found[id(bank)] = (f"<shared by {name}>", bank)
    return list(found.values())


def merge_adapters_(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base weight in place (W <- W0 + ΔW); returns `model`.

    Raises ValueError if a layer is already merged, or if a base weight is tied to another module (merging would
    change that module as well).
    """
    layers = _require_layers(model, "merge_adapters_")
    holders: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for pname, param in module._parameters.items():
            if param is not None:
                holders.setdefault(id(param), []).append(f"{path}.{pname}" if path else pname)
    for name, layer in layers.items():
        if layer.merged:
            raise ValueError(f"adapter {name!r} is already merged; call unmerge_adapters_ first")
        places = holders.get(id(layer.base_layer.weight), [])
        if len(places) > 1:
            others = [p for p in places if not p.endswith(f"{name}.base_layer.weight")]
            raise ValueError(f"cannot merge into {name!r}: its weight is tied to {others}; merging would change "
                             "those modules too (keep the adapter unmerged, or untie the weights)")
    for layer in layers.values():
        layer.merge()
    return model


def unmerge_adapters_(model: nn.Module) -> nn.Module:
    """Subtract every merged ΔW from its base weight in place (W <- W − ΔW); returns `model`."""
    layers = _require_layers(model, "unmerge_adapters_")
    for name, layer in layers.items():
        if not layer.merged:
            raise ValueError(f"adapter {name!r} is not merged; nothing to unmerge")
    for layer in layers.values():
        layer.unmerge()
    return model


def merge_and_unload(model: AdaptedModel) -> nn.Module:
    """A plain copy of the adapted model with every ΔW merged and every wrapper replaced by its base `nn.Linear`
    (requires_grad flags as they were before attaching); `model` is untouched."""
    if not isinstance(model, AdaptedModel):
        raise TypeError(f"merge_and_unload takes an AdaptedModel, got {type(model).__name__}")
    clone = copy.deepcopy(model)
    layers = adapted_layers(clone)
    if any(not layer.merged for layer in layers.values()):
        for layer in layers.values():
            if layer.merged:
                layer.unmerge()
        merge_adapters_(clone)
    plain = clone.base_model
    for name, layer in layers.items():
        _set_submodule(plain, name, layer.base_layer)
    for name, param in plain.named_parameters():
        param.requires_grad_(model.base_requires_grad.get(name, True))
    return plain


# ----------------------------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------------------------


def _wrapper_prefixes(model: nn.Module) -> dict[str, AdapterLinear]:
    """state_dict key prefix -> wrapper, for keys of `model.state_dict()`."""
    return {(name + "." if name else ""): m for name, m in model.named_modules() if isinstance(m, AdapterLinear)}


def _require_reachable_banks(model: nn.Module, layers: Mapping[str, AdapterLinear], what: str) -> None:
    for key, bank in _shared_banks(model, layers):
        if key.startswith("<shared by"):
            raise ValueError(f"{what}: a {type(bank).__name__} the adapters share is not part of "
                             f"{type(model).__name__}'s state; pass the AdaptedModel that attach_adapters_ returned")


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter's tensors, keyed as in `model.state_dict()` (copies): adapter parameters, shared banks, and
    the seeds (0-d int64) that regenerate seeded bases and routing. Base weights are not included."""
    layers = _require_layers(model, "adapter_state_dict")
    _require_reachable_banks(model, layers, "adapter_state_dict")
    state: dict[str, torch.Tensor] = {}
    for prefix, layer in _wrapper_prefixes(model).items():
        state.update(layer.adapter_state(prefix))
    if isinstance(model, AdaptedModel):
        for key, value in model.adapter_banks.state_dict(prefix="adapter_banks.").items():
            state[key] = value.detach().clone()
    return state


def load_adapter_state_dict_(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Load an `adapter_state_dict` into a model adapted with the same config; returns `model`.

    The keys must be exactly those `adapter_state_dict(model)` gives (else a KeyError lists the missing and
    unexpected ones). Loaded seeds regenerate NOLA bases and MoS routing, so the reloaded adapter is identical.
    """
    _require_layers(model, "load_adapter_state_dict_")
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping of name -> tensor, got {type(state).__name__}")
    expected = set(adapter_state_dict(model))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise KeyError(f"adapter state does not fit this model: missing {missing[:8]}, unexpected {unexpected[:8]} "
                       "(was it saved from a model adapted with the same config and targets?)")
    converted: dict[str, torch.Tensor] = {}
    for prefix, layer in _wrapper_prefixes(model).items():
        converted.update(layer.import_state(prefix, state))
    for key, value in state.items():
        if key.startswith("adapter_banks."):
            converted[key] = value
    result = model.load_state_dict(converted, strict=False)
    if result.unexpected_keys:
        raise KeyError(f"unexpected keys when loading the adapter state: {result.unexpected_keys[:8]}")
    return model


# ----------------------------------------------------------------------------------------------------------------
# Counting and diagnostics
# ----------------------------------------------------------------------------------------------------------------


def adapter_ledger(model: nn.Module, *, name: str | None = None) -> ParamLedger:
    """A `lablib.ledger.ParamLedger` row for the adapters alone (wrappers' adapter parts + each shared bank once);
    definitions in the module docstring. `ledger(adapted)` gives the whole model, base included."""
    layers = _require_layers(model, "adapter_ledger")
    totals = {"total": 0, "active_per_token": 0, "stored": 0, "trainable": 0, "flops_per_token": 0}
    for layer in layers.values():
        counts = layer.adapter_counts()
        for key in totals:
            totals[key] += int(getattr(counts, key))
    banks = _shared_banks(model, layers)
    for _, bank in banks:
        counts = bank.ledger_counts()
        trainable = counts.trainable
        if trainable is None:
            trainable = sum(p.numel() for p in bank.parameters() if p.requires_grad)
        totals["total"] += counts.total
        totals["active_per_token"] += counts.active_per_token
        totals["stored"] += counts.stored
        totals["trainable"] += trainable
        totals["flops_per_token"] += counts.flops_per_token
    kinds = sorted({layer.kind for layer in layers.values()})
    notes = f"{len(layers)} layers ({', '.join(kinds)})"
    if banks:
        notes += f", shared: {', '.join(key for key, _ in banks)}"
    return ParamLedger(name=name if name is not None else f"adapters: {', '.join(kinds)}", notes=notes, **totals)


@dataclass
class BankUsage:
    """Which entries of one shared bank each adapted layer picks (plain tensors, for plots).

    * `bank`: the bank's key in `adapted.adapter_banks`; `factor`: `"A"` or `"B"` (which factor's picks).
    * `layers`: layer names, one per row of `counts`.
    * `counts`: (n_layers, bank_size) int64, how many sub-vectors / shards of that layer's factor use entry j.
    * `weights`: (n_layers, bank_size) float, summed top-k weights per entry (VB-LoRA), or None (MoS picks are
      unweighted).
    * `indices`: per layer, the raw picks (VB-LoRA: (…, k) top-k indices; MoS: (r, shards_per_vector) pool rows).
    * `private_from`: first pool row that is private to one layer (MoS with shard privatization), else None.
    """

    bank: str
    factor: str
    layers: list[str]
    counts: torch.Tensor
    weights: torch.Tensor | None
    indices: dict[str, torch.Tensor]
    private_from: int | None = None


def bank_usage(model: nn.Module) -> list[BankUsage]:
    """Bank usage of every shared bank that picks entries (VB-LoRA's vector bank, MoS's pools), A then B per bank;
    empty for LoRA, NOLA and Compacter (which share nothing, or share densely)."""
    layers = _require_layers(model, "bank_usage")
    usage: list[BankUsage] = []
    for key, bank in _shared_banks(model, layers):
        if not callable(getattr(bank, "usage", None)):
            continue
        users = {name: layer for name, layer in layers.items() if layer.shared is bank}
        usage.extend(bank.usage(key, users))
    return usage
