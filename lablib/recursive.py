"""# lablib.recursive: recursive (layer-tied) transformers

A *recursive* transformer loops K unique blocks `num_recursion` times, so an effective depth of
`L = K * num_recursion` costs only K blocks of parameters (Bae et al., *Relaxed Recursive Transformers*, 2024;
Bae et al., *Mixture-of-Recursions*, 2025). Vocabulary follows MoR:

* `sharing="cycle"`    ABAB: depth d uses block `d % K`              (the whole stack is looped).
* `sharing="sequence"` AABB: depth d uses block `d // num_recursion` (each block repeated in place).
* `initialization` from a pretrained vanilla model with L layers (L = K * num_recursion):
  - `"stepwise"`: tied block k copies the *first* original layer mapped onto it (cycle: layer k; sequence: layer
    k * num_recursion), i.e. selects every num_recursion-th / every K-th layer.
  - `"average"`: tied block k is the elementwise mean of all original layers mapped onto it.
  - `"lower"`: tied block k copies original layer k (the lowest K layers).

Parameters are *tied*: the same `Block` objects are reused, so the ledger counts K blocks once while
FLOPs per token count every application: `F = F_embed/head + L_eff * F_block` (see `recursive_ledger`).

Relaxed recursion: `RelaxedRecursiveTransformer` (per-depth LoRA from truncated SVD; rank is the knob).

Mixture-of-Depths: `MixtureOfDepthsTransformer`.

Not implemented yet (see issue 6): Mixture-of-Recursions,
KV strategies and relative-norm halting.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import math

import torch
from torch import nn

from lablib import ledger as _ledger
from lablib.models import BlocksOutput, TinyTransformer, TransformerConfig

Sharing = Literal["cycle", "sequence"]
SHARINGS = ("cycle", "sequence")
INITIALIZATIONS = ("stepwise", "average", "lower")


def block_schedule(*, num_unique: int, num_recursion: int, sharing: str) -> list[int]:
    """Block index used at each effective depth d = 0..K*N-1 (cycle: d % K; sequence: d // N)."""
    if sharing not in SHARINGS:
        raise ValueError(f"sharing must be one of {SHARINGS}, got {sharing!r}")
    if num_unique < 1 or num_recursion < 1:
        raise ValueError(f"num_unique and num_recursion must be >= 1, got {num_unique}, {num_recursion}")
    depth = num_unique * num_recursion
    if sharing == "cycle":
        return [d % num_unique for d in range(depth)]
    return [d // num_recursion for d in range(depth)]


class RecursiveTransformer(TinyTransformer):
    """TinyTransformer whose `config.n_layers` = K unique blocks are applied `num_recursion` times."""

    def __init__(self, config: TransformerConfig, *, num_recursion: int, sharing: str = "cycle") -> None:
        super().__init__(config)
        self.num_recursion = int(num_recursion)
        self.sharing = sharing
        self.schedule = block_schedule(num_unique=config.n_layers, num_recursion=num_recursion, sharing=sharing)

    @property
    def effective_depth(self) -> int:
        return len(self.schedule)

    def _run_blocks(self, x: torch.Tensor) -> BlocksOutput:
        aux_loss = x.new_zeros(())
        layer_outputs = []
        for k in self.schedule:
            out = self.blocks[k](x)
            x, aux_loss = out.x, aux_loss + out.aux_loss
            layer_outputs.append(out.ffn_output)
        return BlocksOutput(x=x, aux_loss=aux_loss, layer_outputs=layer_outputs)

    @classmethod
    def from_vanilla(
        cls,
        vanilla: TinyTransformer,
        *,
        num_recursion: int,
        sharing: str = "cycle",
        initialization: str = "stepwise",
    ) -> "RecursiveTransformer":
        """Build a recursive model from a deeper vanilla one (L = K * num_recursion layers; see module docstring)."""
        if initialization not in INITIALIZATIONS:
            raise ValueError(f"initialization must be one of {INITIALIZATIONS}, got {initialization!r}")
        depth = vanilla.config.n_layers
        if num_recursion < 1 or depth % num_recursion:
            raise ValueError(f"num_recursion={num_recursion} must divide the vanilla depth {depth} (N*K = L)")
        k_unique = depth // num_recursion
        model = cls(replace(vanilla.config, n_layers=k_unique), num_recursion=num_recursion, sharing=sharing)
        own = model.state_dict()
        src = vanilla.state_dict()
        for key in own:
            if not key.startswith("blocks."):
                own[key] = src[key].clone()
        schedule = model.schedule
        for k in range(k_unique):
            mapped = [d for d, b in enumerate(schedule) if b == k]
            if initialization == "stepwise":
                chosen = [mapped[0]]
            elif initialization == "lower":
                chosen = [k]
            else:
                chosen = mapped
            prefix = f"blocks.{k}."
            for key in own:
                if key.startswith(prefix):
                    rest = key[len(prefix):]
                    own[key] = torch.stack([src[f"blocks.{d}.{rest}"].float() for d in chosen]).mean(0).to(own[key].dtype)
        model.load_state_dict(own)
        return model


def recursive_ledger(model: RecursiveTransformer, *, seq_len: int | None = None) -> _ledger.ParamLedger:
    """Ledger row: parameters counted once (tied blocks), FLOPs per token counting every block application.

    F_total = F_ledger(model) + sum_k (uses_k - 1) * F_ledger(block_k), with uses_k the applications of block k.
    """
    row = _ledger.ledger(model, name=type(model).__name__, seq_len=seq_len)
    extra = 0
    for k, block in enumerate(model.blocks):
        uses = model.schedule.count(k)
        extra += (uses - 1) * _ledger.ledger(block, seq_len=seq_len).flops_per_token
    return replace(row, flops_per_token=row.flops_per_token + extra,
                   notes=f"{len(model.blocks)} tied blocks x {model.num_recursion} recursions ({model.sharing})")


class RelaxedRecursiveTransformer(RecursiveTransformer):
    """Relaxed recursion: depth d uses W_k + B_d A_d on every 2-D weight of its tied block k (Bae et al., 2024).

    Initialised from the truncated SVD of the residual  R_d = W_orig_d - W_tied_k = U S V^T:
    B_d = U[:, :r] sqrt(S[:r]),  A_d = sqrt(S[:r]) V[:r, :].  r = 0: pure recursion; r = min(out, in): original model.
    Implemented with `torch.func.functional_call` rather than `lablib.adapters` wrappers, because one shared module
    needs a *different* adapter per depth (an adapter wrapper attached to the module would be shared too).
    Ledger: `ledger()` counts tied blocks once plus the LoRA factors; FLOPs per token are those of
    `recursive_ledger` (weights are merged W_k + B_d A_d once per forward, a per-batch not per-token cost).
    """

    def __init__(self, config: TransformerConfig, *, num_recursion: int, sharing: str = "cycle", rank: int = 0) -> None:
        super().__init__(config, num_recursion=num_recursion, sharing=sharing)
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        self.rank = int(rank)
        self.lora = nn.ParameterDict()

    @staticmethod
    def _key(d: int, name: str, part: str) -> str:
        return f"d{d}__{name.replace('.', '__')}__{part}"

    def _run_blocks(self, x: torch.Tensor) -> BlocksOutput:
        aux_loss = x.new_zeros(())
        layer_outputs = []
        for d, k in enumerate(self.schedule):
            block = self.blocks[k]
            params = dict(block.named_parameters())
            for name, p in list(params.items()):
                a_key = self._key(d, name, "A")
                if a_key in self.lora:
                    params[name] = p + self.lora[self._key(d, name, "B")] @ self.lora[a_key]  # W_k + B_d A_d
            out = torch.func.functional_call(block, params, (x,))
            x, aux_loss = out.x, aux_loss + out.aux_loss
            layer_outputs.append(out.ffn_output)
        return BlocksOutput(x=x, aux_loss=aux_loss, layer_outputs=layer_outputs)

    @classmethod
    def from_vanilla(
        cls,
        vanilla: TinyTransformer,
        *,
        num_recursion: int,
        sharing: str = "cycle",
        initialization: str = "stepwise",
        rank: int = 0,
    ) -> "RelaxedRecursiveTransformer":
        base = RecursiveTransformer.from_vanilla(
            vanilla, num_recursion=num_recursion, sharing=sharing, initialization=initialization
        )
        model = cls(base.config, num_recursion=num_recursion, sharing=sharing, rank=rank)
        model.load_state_dict(base.state_dict())
        if rank == 0:
            return model
        for d, k in enumerate(model.schedule):
            orig = dict(vanilla.blocks[d].named_parameters())
            for name, p in model.blocks[k].named_parameters():
                if p.dim() != 2:
                    continue
                resid = (orig[name] - p).detach().double()
                u, s, vh = torch.linalg.svd(resid, full_matrices=False)
                r = min(rank, s.numel())
                root = s[:r].sqrt()
                model.lora[cls._key(d, name, "B")] = nn.Parameter((u[:, :r] * root).to(p.dtype))
                model.lora[cls._key(d, name, "A")] = nn.Parameter((root[:, None] * vh[:r]).to(p.dtype))
        return model


class MixtureOfDepthsTransformer(TinyTransformer):
    """Mixture-of-Depths (Raposo et al., 2024): each block processes only the top-C tokens of each sequence.

    Per block l, a linear router gives r_t = w_l . x_t; C = ceil(capacity * T) tokens with the largest r_t are
    gathered (kept in time order), run through the block, and scattered back:
        x_t <- x_t + g(r_t) * (f_l(x_sel)_t - x_t)   for selected t,   x_t unchanged otherwise,
    with g = 1 for `gate="none"` and g(r) = r for `gate="router"` (the paper's choice; it makes the router trainable).
    Capacity 1.0 with `gate="none"` is exactly the vanilla block.

    Causality caveat: top-C over the whole sequence looks at future tokens' router scores, so training-time selection
    is non-causal; autoregressive sampling would need a causal predictor of the selection (not implemented).
    FLOPs per token spent: see `mod_flops_per_token`.
    """

    def __init__(self, config: TransformerConfig, *, capacity: float = 0.5, gate: str = "router") -> None:
        super().__init__(config)
        if not (0.0 < capacity <= 1.0):
            raise ValueError(f"capacity must be in (0, 1], got {capacity!r}")
        if gate not in ("none", "router"):
            raise ValueError(f"gate must be 'none' or 'router', got {gate!r}")
        self.capacity = float(capacity)
        self.gate = gate
        self.routers = nn.ModuleList(nn.Linear(config.d_model, 1, bias=False) for _ in range(config.n_layers))

    def tokens_per_block(self, seq_len: int) -> int:
        return max(1, math.ceil(self.capacity * seq_len))

    def _run_blocks(self, x: torch.Tensor) -> BlocksOutput:
        aux_loss = x.new_zeros(())
        layer_outputs = []
        batch, time, dim = x.shape
        c = self.tokens_per_block(time)
        for block, router in zip(self.blocks, self.routers):
            scores = router(x).squeeze(-1)  # (B, T)
            idx = scores.topk(c, dim=1).indices.sort(dim=1).values  # (B, C), time order kept
            gather = idx.unsqueeze(-1).expand(batch, c, dim)
            x_sel = x.gather(1, gather)
            out = block(x_sel)
            delta = out.x - x_sel
            if self.gate == "router":
                delta = delta * scores.gather(1, idx).unsqueeze(-1)
            x = x.scatter(1, gather, x_sel + delta)
            aux_loss = aux_loss + out.aux_loss
            layer_outputs.append(out.ffn_output)
        return BlocksOutput(x=x, aux_loss=aux_loss, layer_outputs=layer_outputs)


def mod_flops_per_token(model: MixtureOfDepthsTransformer, *, seq_len: int) -> float:
    """FLOPs per token actually spent: F_other + (C/T) * sum_l F_block_l (+ router 2*d_model per layer per token)."""
    row = _ledger.ledger(model, seq_len=seq_len)
    block_flops = sum(_ledger.ledger(b, seq_len=seq_len).flops_per_token for b in model.blocks)
    frac = model.tokens_per_block(seq_len) / seq_len
    return row.flops_per_token - (1.0 - frac) * block_flops
