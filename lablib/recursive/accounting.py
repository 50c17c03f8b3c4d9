"""The ledger of recursive, adaptive-depth and depth-skipping models, with the KV cache they need.

`recursion_ledger(model, *, seq_len=None, diagnostics=None)` returns a `RecursionLedger`: the `lablib.ledger` numbers
(total / active per token / stored / trainable, counted by tensor identity so tied blocks count once) plus the FLOPs
per token *actually spent* and the KV-cache size for one sequence of `seq_len` tokens:

    flops_per_token = 2 V d (LM head)  +  routers  +  Σ_r f_r Σ_j [ 2 · matmul_weights(block_{rK+j}) + 4 · ctx_r · d ]
    kv_cache_entries = Σ_r Σ_j (tokens whose K/V step r, layer j stores) ,   kv_cache_numbers = entries · 2 d

with f_r the fraction of tokens that ran recursion step r and ctx_r the keys each of them attends to (f_r · T for
recursion-wise attention, T for recursive KV sharing at r >= 1). f_r comes from a forward's `RecursionDiagnostics`
when given; otherwise from the model: 1 for every step of a recursive model, `k_r / T` for expert-choice MoR in top-k
mode, and 1 (an upper bound) for token choice and causal expert choice, whose depths depend on the data.
Mixture-of-Depths: a routed block costs C/T of a block whose attention sees C keys, and caches C entries.
A plain `TinyTransformer` gets `lablib.ledger.ledger`'s row with T entries per layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

from torch import nn

from lablib import ledger as _ledger
from lablib.models import TinyTransformer
from lablib.recursive.core import RecursionDiagnostics, RecursiveTransformer
from lablib.recursive.mod import MixtureOfDepthsTransformer
from lablib.recursive.mor import MixtureOfRecursionsTransformer, tokens_at_step


@dataclass(frozen=True)
class RecursionLedger:
    """A ledger row (see `lablib.ledger.ParamLedger`) plus the KV cache of one `seq_len`-token sequence."""

    name: str
    total: int
    active_per_token: int
    stored: int
    trainable: int
    flops_per_token: int
    kv_cache_entries: int
    kv_cache_numbers: int
    mean_depth: float
    seq_len: int
    notes: str = ""

    def params(self) -> _ledger.ParamLedger:
        """The `lablib.ledger.ParamLedger` row (for `format_ledger`)."""
        return _ledger.ParamLedger(name=self.name, total=self.total, active_per_token=self.active_per_token,
                                   stored=self.stored, trainable=self.trainable,
                                   flops_per_token=self.flops_per_token, notes=self.notes)

    def as_row(self) -> dict[str, Any]:
        return asdict(self)


def _unique_counts(model: nn.Module) -> tuple[int, int, int]:
    """(total, trainable, stored) by tensor identity: `parameters()` yields each tied Parameter once."""
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    buffers = 0
    seen: set[int] = set()
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set and id(buffer) not in seen:
                seen.add(id(buffer))
                buffers += buffer.numel()
    return total, trainable, total + buffers


def matmul_flops(module: nn.Module) -> int:
    """2 · (matmul weights used per token) of a module, attention scores excluded (the ledger at context 1 minus
    its 4 d per attention layer)."""
    row = _ledger.ledger(module, seq_len=1)
    attention = sum(int(m.attention_flops_per_token(seq_len=1)) for m in module.modules()
                    if callable(getattr(m, "attention_flops_per_token", None)))
    return row.flops_per_token - attention


def step_fractions(model: RecursiveTransformer, *, seq_len: int,
                   diagnostics: RecursionDiagnostics | None = None,
                   fractions: Sequence[float] | None = None) -> list[float]:
    """f_r, the fraction of tokens that run recursion step r (see the module docstring); `fractions` overrides."""
    n = model.num_recursion
    if fractions is not None:
        out = [float(f) for f in fractions]
        if len(out) != n or any(not 0.0 <= f <= 1.0 for f in out) or any(b > a for a, b in zip(out, out[1:])):
            raise ValueError(f"fractions must be {n} non-increasing values in [0, 1], got {list(fractions)}")
        return out
    if diagnostics is not None:
        if len(diagnostics.tokens_per_step) != n:
            raise ValueError(f"diagnostics has {len(diagnostics.tokens_per_step)} steps, the model {n}")
        return [t / diagnostics.num_tokens for t in diagnostics.tokens_per_step]
    if (isinstance(model, MixtureOfRecursionsTransformer) and model.routing == "expert_choice"
            and not model.causal_routing):
        return [tokens_at_step(c, seq_len) / seq_len for c in model.capacities]
    return [1.0] * n


def recursion_ledger(model: nn.Module, *, seq_len: int | None = None,
                     diagnostics: RecursionDiagnostics | None = None, fractions: Sequence[float] | None = None,
                     name: str | None = None) -> RecursionLedger:
    """Parameters, FLOPs per token spent and KV-cache size (see the module docstring). `fractions` (one per
    recursion step) replaces the model's or the diagnostics' f_r, e.g. to plan a budget for a balanced router."""
    if not isinstance(model, TinyTransformer):
        raise TypeError(f"recursion_ledger takes a TinyTransformer (or a recursive / MoD one), got "
                        f"{type(model).__name__}")
    if diagnostics is not None and not isinstance(diagnostics, RecursionDiagnostics):
        raise TypeError(f"diagnostics must be RecursionDiagnostics or None, got {type(diagnostics).__name__}")
    if seq_len is None:
        seq_len = diagnostics.depth.shape[1] if diagnostics is not None else model.config.seq_len
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    total, trainable, stored = _unique_counts(model)
    d, vocab = model.config.d_model, model.config.vocab_size
    head = 2 * vocab * d
    attention_per_key = 2 * 2 * d  # q·k and the weighted sum of values, per key
    label = name or type(model).__name__
    if isinstance(model, RecursiveTransformer) and model.sharing.startswith("middle_"):
        # every depth runs every token (no adaptive depth with the middle variants)
        flops = head + sum(matmul_flops(block) + attention_per_key * seq_len for block in model.blocks)
        entries = float(len(model.blocks) * seq_len)
        mean_depth = float(model.num_recursion)
        notes = (f"1 + {model.num_unique} x {model.num_recursion} + 1 layers ({model.sharing}), "
                 f"{len(model.unique_blocks)} unique blocks")
    elif isinstance(model, RecursiveTransformer):
        k_unique, n = model.num_unique, model.num_recursion
        fractions = step_fractions(model, seq_len=seq_len, diagnostics=diagnostics, fractions=fractions)
        sharing_kv = model.kv_sharing
        flops = float(head)
        entries = 0.0
        for r, f in enumerate(fractions):
            context = seq_len if (sharing_kv and r > 0) else f * seq_len
            for j in range(k_unique):
                block = model.blocks[r * k_unique + j]
                flops += f * (matmul_flops(block) + attention_per_key * context)
            if not (sharing_kv and r > 0):
                entries += f * seq_len * k_unique
        if isinstance(model, MixtureOfRecursionsTransformer):
            if model.routing == "expert_choice":
                # router r scores the tokens that ran step r-1 (all of them at r = 0)
                flops += sum(2 * d * (fractions[r - 1] if r else 1.0) for r in range(n))
            else:
                flops += 2 * d * n
        mean_depth = sum(fractions)
        notes = (f"{k_unique} unique x {n} recursions ({model.sharing}); mean depth {mean_depth:.2f} steps"
                 + (f"; kv {model.kv_strategy}" if isinstance(model, MixtureOfRecursionsTransformer) else ""))
    elif isinstance(model, MixtureOfDepthsTransformer):
        c = model.tokens_per_block(seq_len)
        frac = c / seq_len
        flops = float(head)
        entries = 0.0
        for i, block in enumerate(model.blocks):
            if i in model.routed_layers:
                flops += 2 * d + frac * (matmul_flops(block) + attention_per_key * c)
                entries += c
            else:
                flops += matmul_flops(block) + attention_per_key * seq_len
                entries += seq_len
        mean_depth = (len(model.blocks) - len(model.routed_layers) * (1 - frac)) / len(model.blocks)
        notes = f"MoD capacity {model.capacity:g} on {len(model.routed_layers)} of {len(model.blocks)} blocks"
    else:
        row = _ledger.ledger(model, seq_len=seq_len)
        flops = float(row.flops_per_token)
        entries = float(model.config.n_layers * seq_len)
        mean_depth = 1.0
        notes = f"{model.config.n_layers} layers"
    entries_int = int(round(entries))
    return RecursionLedger(name=label, total=total, active_per_token=total, stored=stored, trainable=trainable,
                           flops_per_token=int(round(flops)), kv_cache_entries=entries_int,
                           kv_cache_numbers=entries_int * 2 * d, mean_depth=float(mean_depth), seq_len=seq_len,
                           notes=notes)
