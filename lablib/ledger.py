"""The parameter ledger: four honest numbers for "how big is this model?".

Parameter-efficiency papers compare models by different counts, and most confusion comes from mixing them up. The
ledger keeps them apart:

* **total**: unique parameters the model has. Tensors are identified by identity, so a tied embedding / LM head or a
  module reused in several places counts once.
* **active_per_token**: parameters one token touches. A dense model touches all of them (the embedding table
  counts whole, as MoE papers do); a mixture of experts only its routed top-k experts.
* **stored**: numbers you must save to reproduce the model: unique parameters plus persistent buffers, minus
  anything regenerated from a seed (random projections, NOLA bases...).
* **trainable**: unique parameters with `requires_grad=True` (frozen ones still count in total and stored).
* **flops_per_token**: forward FLOPs per token (2 per multiply-add), Kaplan-style
  ([Kaplan et al. 2020](https://arxiv.org/abs/2001.08361), Table 1):

      flops_per_token = 2 * (matmul weights used per token) + Σ_attention_layers 2 * 2 * seq_len * d_model

  The first term is every `nn.Linear` weight once per place it appears in the module tree, the tied or untied LM
  head included, embedding lookups excluded (they are reads, not matmuls); biases, LayerNorms, activations and
  softmax are ignored. The second term is attention's q·k scores and weighted sum of values over a full context of
  `seq_len` tokens (the causal mask is *not* halved); it comes from every module defining
  `attention_flops_per_token(*, seq_len)` (as `models.CausalSelfAttention` does). For a plain MLP this leaves
  2 * (weight-matrix parameters).

**Extension protocol.** A module that knows better (a mixture of experts, a seeded projection) defines
`ledger_counts(self) -> LedgerCounts`. The walk stops there: that module's numbers replace the generic count of its
whole subtree. Rules that keep every tensor counted exactly once:

1. Any parameter or buffer reachable inside a self-accounting module belongs to that module; the generic count skips
   it everywhere, even where the rest of the model also references it (the module's `ledger_counts` counts it).
   FLOPs are about use, not ownership: an `nn.Linear` outside the subtree still adds its matmul.
2. One self-accounting module instance appearing in several places counts total / stored / trainable once; its
   FLOPs count once per appearance, and its active parameters once per appearance capped at its total.
3. Two *different* self-accounting modules sharing tensors each count them (a warning says so); put the
   `ledger_counts` on the shared module instead (e.g. on a shared expert pool, not on each layer using it).
4. `LedgerCounts.trainable=None` means "count my subtree's parameters with requires_grad".

Dense transformers are checked against the hand-written `transformer_param_formula` and
`transformer_flops_formula` (nanoGPT's / Kaplan's accounting).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

from torch import nn

COLUMNS = (
    ("name", "model"),
    ("total", "total"),
    ("active_per_token", "active/token"),
    ("stored", "stored"),
    ("trainable", "trainable"),
    ("flops_per_token", "FLOPs/token"),
    ("notes", "notes"),
)


@dataclass(frozen=True)
class LedgerCounts:
    """What a self-accounting module's `ledger_counts()` returns (any object with these attributes works).

    `trainable=None` lets the ledger count the module's parameters that have `requires_grad=True`.
    """

    total: int
    active_per_token: int
    stored: int
    flops_per_token: int
    trainable: int | None = None


@dataclass(frozen=True)
class ParamLedger:
    """One model's row in the ledger (see the module docstring for the definitions)."""

    name: str
    total: int
    active_per_token: int
    stored: int
    trainable: int
    flops_per_token: int
    notes: str = ""

    def as_row(self) -> dict[str, Any]:
        """A plain dict, one key per field, for tables and plots."""
        return asdict(self)

    def __str__(self) -> str:
        return format_ledger([self])


def _walk(module: nn.Module, prefix: str = "", ancestors: tuple[int, ...] = ()) -> Iterator[tuple[str, nn.Module]]:
    """Every *appearance* of every module (a module listed twice is yielded twice), not entering self-accounting
    modules' children."""
    if id(module) in ancestors:
        raise ValueError(f"module tree has a cycle at {prefix or '<root>'}")
    yield prefix, module
    if _accounts_for_itself(module):
        return
    # `_modules` rather than named_children(), which would hide a child listed twice
    for child_name, child in module._modules.items():
        if child is not None:
            yield from _walk(child, f"{prefix}.{child_name}" if prefix else child_name, ancestors + (id(module),))


def _accounts_for_itself(module: nn.Module) -> bool:
    return callable(getattr(module, "ledger_counts", None))


def _persistent_buffers(module: nn.Module) -> Iterator[Any]:
    for name, buffer in module._buffers.items():
        if buffer is not None and name not in module._non_persistent_buffers_set:
            yield buffer


def _read_counts(module: nn.Module, where: str) -> dict[str, int | None]:
    counts = module.ledger_counts()
    values: dict[str, int | None] = {}
    for key in ("total", "active_per_token", "stored", "flops_per_token", "trainable"):
        value = getattr(counts, key, None)
        if value is None and key != "trainable":
            raise TypeError(
                f"{where} ({type(module).__name__}).ledger_counts() returned {type(counts).__name__} "
                f"without `{key}`; return a lablib.ledger.LedgerCounts"
            )
        if value is not None and (isinstance(value, bool) or int(value) != value or value < 0):
            raise ValueError(f"{where}.ledger_counts().{key} must be a non-negative int, got {value!r}")
        values[key] = None if value is None else int(value)
    return values


def ledger(model: nn.Module, *, name: str | None = None, seq_len: int | None = None) -> ParamLedger:
    """Count `model`'s parameters and FLOPs per token (definitions and rules in the module docstring).

    * `name`: the row's label (default: the model's class name).
    * `seq_len`: context length for attention's FLOPs (default: each attention module's own `seq_len`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"ledger() takes an nn.Module, got {type(model).__name__}")
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1):
        raise ValueError(f"seq_len must be a positive int or None, got {seq_len!r}")

    generic_params: dict[int, Any] = {}
    generic_buffers: dict[int, Any] = {}
    linear_weights = 0
    attention_flops = 0
    # self-accounting modules by id: (first path, module, number of appearances)
    accounted: dict[int, list[Any]] = {}
    for path, module in _walk(model):
        if _accounts_for_itself(module):
            entry = accounted.setdefault(id(module), [path or "<root>", module, 0])
            entry[2] += 1
            continue
        for param in module._parameters.values():
            if param is not None:
                generic_params[id(param)] = param
        for buffer in _persistent_buffers(module):
            generic_buffers[id(buffer)] = buffer
        if isinstance(module, nn.Linear):
            linear_weights += module.weight.numel()
        if callable(getattr(module, "attention_flops_per_token", None)):
            attention_flops += int(module.attention_flops_per_token(seq_len=seq_len))

    # rule 1: tensors inside a self-accounting subtree are that module's to count
    owned: dict[int, set[int]] = {}
    for key, (path, module, _) in accounted.items():
        owned[key] = {id(t) for t in module.parameters()} | {id(t) for t in module.buffers()}
    claimed: set[int] = set().union(*owned.values()) if owned else set()
    keys = list(owned)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            if owned[a] & owned[b]:
                warnings.warn(
                    f"{accounted[a][0]} and {accounted[b][0]} both define ledger_counts and share tensors, so each "
                    "counts them; define ledger_counts on the shared module instead",
                    stacklevel=2,
                )

    params = [p for key, p in generic_params.items() if key not in claimed]
    buffers = [b for key, b in generic_buffers.items() if key not in claimed]
    generic_total = sum(p.numel() for p in params)
    total = generic_total
    active = generic_total
    stored = generic_total + sum(b.numel() for b in buffers)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    # 2 FLOPs per multiply-add, one multiply-add per weight per token, plus attention scores and values
    flops = 2 * linear_weights + attention_flops

    notes = []
    for path, module, appearances in accounted.values():
        counts = _read_counts(module, path)
        total += counts["total"]
        stored += counts["stored"]
        if counts["trainable"] is None:
            unique = {id(p): p for p in module.parameters()}.values()
            counts["trainable"] = sum(p.numel() for p in unique if p.requires_grad)
        trainable += counts["trainable"]
        # rule 2: reuse repeats the compute, not the parameters
        active += min(appearances * counts["active_per_token"], counts["total"])
        flops += appearances * counts["flops_per_token"]
        times = f" x{appearances}" if appearances > 1 else ""
        notes.append(f"{path}: {type(module).__name__}{times}")
    note = ("ledger_counts: " + ", ".join(notes)) if notes else ""
    return ParamLedger(
        name=name if name is not None else type(model).__name__,
        total=total,
        active_per_token=active,
        stored=stored,
        trainable=trainable,
        flops_per_token=flops,
        notes=note,
    )


def transformer_param_breakdown(config: Any) -> dict[str, int]:
    """Parameters of `models.TinyTransformer(config)` with default blocks, by component, written from the
    architecture by hand:

        embeddings          V d + T d
        attention           per layer: q, k, v, out projections + biases   4 d² + 4 d
        mlp                 per layer: d -> h -> d + biases                2 d h + h + d
        layer_norms         per layer 2 LayerNorms 2 * 2d, plus the final LayerNorm 2 d
        lm_head             V d, only when not tied to the token embedding
    """
    V, d, T, L, h = config.vocab_size, config.d_model, config.seq_len, config.n_layers, config.ffn_hidden
    return {
        "embeddings": V * d + T * d,
        "attention": L * (4 * d * d + 4 * d),
        "mlp": L * (2 * d * h + h + d),
        "layer_norms": L * 2 * (2 * d) + 2 * d,
        "lm_head": 0 if config.tie_embeddings else V * d,
    }


def transformer_param_formula(config: Any) -> int:
    """Total parameters of `models.TinyTransformer(config)`: the sum of `transformer_param_breakdown(config)`."""
    return sum(transformer_param_breakdown(config).values())


def transformer_flops_formula(config: Any, *, seq_len: int | None = None) -> int:
    """Forward FLOPs per token of `models.TinyTransformer(config)`, Kaplan et al. 2020 style.

        2 * (L (4 d² + 2 d h) + V d)  +  2 * 2 * L * seq_len * d
         matmul weights (attention,     attention scores q·k and weighted values over
         MLP, LM head); biases,         the full context (causal mask not halved)
         norms, embeddings ignored

    `seq_len` defaults to `config.seq_len`.
    """
    V, d, L, h = config.vocab_size, config.d_model, config.n_layers, config.ffn_hidden
    context = config.seq_len if seq_len is None else seq_len
    matmul_weights = L * (4 * d * d + 2 * d * h) + V * d
    return 2 * matmul_weights + 2 * 2 * L * context * d


def format_ledger(rows: Sequence[ParamLedger]) -> str:
    """A plain-text table of ledger rows, numbers right-aligned with thousands separators."""
    rows = list(rows)
    for i, row in enumerate(rows):
        if not isinstance(row, ParamLedger):
            raise TypeError(f"format_ledger takes ParamLedger rows; row {i} is a {type(row).__name__}")
    table = [[title for _, title in COLUMNS]]
    for row in rows:
        values = row.as_row()
        table.append([values[key] if isinstance(values[key], str) else f"{values[key]:,}" for key, _ in COLUMNS])
    widths = [max(len(line[c]) for line in table) for c in range(len(COLUMNS))]
    text_columns = {0, len(COLUMNS) - 1}

    def render(line: list[str]) -> str:
        cells = [
            cell.ljust(width) if c in text_columns else cell.rjust(width)
            for c, (cell, width) in enumerate(zip(line, widths))
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([render(table[0]), rule, *(render(line) for line in table[1:])])
