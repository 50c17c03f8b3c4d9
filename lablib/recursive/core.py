"""Layer tying: a stack of L = K * num_recursion layers whose parameters are K unique blocks.

Vocabulary follows the Mixture-of-Recursions code (`../shared/research/anchors-tech.md` §5 and (b)7):

* `config.n_layers` is the effective depth L (MoR's `base_depth`); `num_recursion` = N; `num_unique` K = L / N.
* `sharing="cycle"`    ABAB: depth d uses unique block `d % K` (the whole K-block stack is looped N times);
  `sharing="sequence"` AABB: depth d uses unique block `d // N` (each block repeated N times in place);
  `"middle_cycle"` / `"middle_sequence"`: the first and last layers stay unique and the L - 2 middle layers are
  shared by the same rules, K = (L - 2) / N (Relaxed Recursive Transformers / MoR code). Halting, Mixture-of-Recursions
  and `generate_cached` loop the whole stack, so they need `"cycle"`.
* `ln_share`: LayerNorms tied with their block (True) or kept per depth (False). Biases are tied with their weights.
* `initialization` (from a pretrained L-layer model, `from_vanilla`):
  - `"stepwise"`: unique block i <- layer `round(linspace(0, L-1, K))_i` (evenly spaced, first and last kept);
  - `"lower"`: unique block i <- layer i;   `"upper"`: unique block i <- layer L-K+i;
  - `"average"`: unique block i <- elementwise mean of the layers tied to it by the sharing rule.

**Tie parameters, not modules.** The model keeps L distinct `Block` modules (so `blocks[d]` is depth d, as in a
vanilla model) and assigns the *same* `nn.Parameter` object to every depth tied to one unique block. Gradients from
every loop accumulate in that one tensor; `model.parameters()` and `lablib.ledger` count it once while FLOPs count
every depth; and a per-depth adapter can wrap `blocks[d].attn.qkv` without touching the other depths
(`RelaxedRecursiveTransformer`).

**Halting** (`halting_threshold=τ`, an inference-time option; sharing must be cycle): after recursion step r (one pass
over the K unique blocks) each token computes ρ = ‖Δ‖₂ / (‖h‖₂ + ε) of its update; a token with ρ < τ halts: it skips
all later steps and, like a finished token in Mixture-of-Recursions' recursion-wise caching, no longer appears as a key
to later steps. τ = 0 is the plain model; τ = ∞ runs one step. The spec is our reading of the Equifinality paper's
relative-norm halting (`specs-moe-recursion.md` §3.4), applied per recursion step rather than per MoE hop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lablib.models import BlocksOutput, LMOutput, TinyTransformer, TransformerConfig
from lablib.recursive.engine import KV, active_mask, block_step, causal_mask

SHARINGS = ("cycle", "sequence", "middle_cycle", "middle_sequence")
INITIALIZATIONS = ("stepwise", "average", "lower", "upper")
HALTING_EPS = 1e-6


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_depth(*, n_layers: int, num_recursion: int, sharing: str = "cycle") -> int:
    """K = n_layers / num_recursion ((n_layers - 2) / num_recursion for the middle variants), or a ValueError saying
    why N * K cannot equal the requested depth."""
    if not _is_int(num_recursion) or num_recursion < 1:
        raise ValueError(f"num_recursion must be an int >= 1, got {num_recursion!r}")
    if sharing.startswith("middle_"):
        middle = n_layers - 2
        if middle < 1 or middle % num_recursion:
            raise ValueError(
                f"{sharing}: the {middle} middle layers of n_layers={n_layers} must equal num_unique K * "
                f"num_recursion N, but {middle} is not a positive multiple of num_recursion={num_recursion}"
            )
        return middle // num_recursion
    if n_layers % num_recursion:
        raise ValueError(
            f"n_layers={n_layers} (the effective depth L) must equal num_unique K * num_recursion N, "
            f"but {n_layers} is not divisible by num_recursion={num_recursion}"
        )
    return n_layers // num_recursion


def block_schedule(*, num_unique: int, num_recursion: int, sharing: str) -> list[int]:
    """Unique block used at each depth (cycle: d % K; sequence: d // N; middle variants: block 0 first, the K shared
    blocks 1..K in the middle by the same rule, block K + 1 last; K * N (+ 2) depths)."""
    if sharing not in SHARINGS:
        raise ValueError(f"sharing must be one of {SHARINGS}, got {sharing!r}")
    if not _is_int(num_unique) or not _is_int(num_recursion) or num_unique < 1 or num_recursion < 1:
        raise ValueError(f"num_unique and num_recursion must be ints >= 1, got {num_unique!r}, {num_recursion!r}")
    if sharing.startswith("middle_"):
        inner = block_schedule(num_unique=num_unique, num_recursion=num_recursion, sharing=sharing[len("middle_"):])
        return [0] + [1 + b for b in inner] + [num_unique + 1]
    depth = num_unique * num_recursion
    if sharing == "cycle":
        return [d % num_unique for d in range(depth)]
    return [d // num_recursion for d in range(depth)]


def source_layers(*, n_layers: int, num_recursion: int, sharing: str, initialization: str) -> list[list[int]]:
    """For each unique block, the original layers it is initialised from (one, or several to average)."""
    if initialization not in INITIALIZATIONS:
        raise ValueError(f"initialization must be one of {INITIALIZATIONS}, got {initialization!r}")
    k_unique = check_depth(n_layers=n_layers, num_recursion=num_recursion, sharing=sharing)
    schedule = block_schedule(num_unique=k_unique, num_recursion=num_recursion, sharing=sharing)
    if sharing.startswith("middle_"):
        # first and last layers keep themselves; the middle blocks follow the rules on layers 1..L-2
        inner = source_layers(n_layers=n_layers - 2, num_recursion=num_recursion,
                              sharing=sharing[len("middle_"):], initialization=initialization)
        return [[0]] + [[d + 1 for d in layers] for layers in inner] + [[n_layers - 1]]
    if initialization == "stepwise":
        # round(linspace(0, L-1, K)) (round half to even, as numpy)
        step = (n_layers - 1) / (k_unique - 1) if k_unique > 1 else 0.0
        return [[int(round(i * step))] for i in range(k_unique)]
    if initialization == "lower":
        return [[i] for i in range(k_unique)]
    if initialization == "upper":
        return [[n_layers - k_unique + i] for i in range(k_unique)]
    return [[d for d, b in enumerate(schedule) if b == i] for i in range(k_unique)]


@dataclass
class RecursionDiagnostics:
    """What one adaptive-depth forward did.

    * `depth`: (B, T) recursion steps each token ran (1..num_recursion).
    * `tokens_per_step`: tokens (over the batch) that ran step r, r = 0..N-1.
    * `kv_cache_entries`: (token, layer) key/value pairs a KV cache would hold for this batch (recursion-wise: the
      active tokens of every step and layer; KV sharing: step 0's only).
    * `num_tokens`: B * T.
    * `router_weights`: (B, T, N) the gate weight each token got at each step (NaN where it did not run), or None.
    """

    depth: torch.Tensor
    tokens_per_step: list[int]
    kv_cache_entries: int
    num_tokens: int
    router_weights: torch.Tensor | None = None

    @property
    def mean_depth(self) -> float:
        return float(self.depth.float().mean())


@dataclass
class RecursionOutput(LMOutput):
    """`LMOutput` plus the recursion diagnostics (None for a plain full-depth forward)."""

    recursion: RecursionDiagnostics | None = None


class RecursiveTransformer(TinyTransformer):
    """A TinyTransformer of depth `config.n_layers` = K * num_recursion whose blocks are K tied unique blocks."""

    kv_sharing = False

    def __init__(
        self,
        config: TransformerConfig,
        *,
        num_recursion: int,
        sharing: str = "cycle",
        ln_share: bool = True,
        halting_threshold: float | None = None,
    ) -> None:
        if sharing not in SHARINGS:
            raise ValueError(f"sharing must be one of {SHARINGS}, got {sharing!r}")
        k_unique = check_depth(n_layers=config.n_layers, num_recursion=num_recursion, sharing=sharing)
        if not isinstance(ln_share, bool):
            raise TypeError(f"ln_share must be a bool, got {ln_share!r}")
        super().__init__(config)
        self.num_recursion = num_recursion
        self.num_unique = k_unique
        self.sharing = sharing
        self.ln_share = ln_share
        self.schedule = block_schedule(num_unique=k_unique, num_recursion=num_recursion, sharing=sharing)
        # the first depth that uses each unique block owns its parameters
        self.owner_depth = [self.schedule.index(k) for k in range(max(self.schedule) + 1)]
        self.halting_threshold = halting_threshold
        self._tie()
        self.last_diagnostics: RecursionDiagnostics | None = None

    # -- tying --

    def _tie(self) -> None:
        for d, k in enumerate(self.schedule):
            owner = self.blocks[self.owner_depth[k]]
            if self.blocks[d] is owner:
                continue
            for name, module in self.blocks[d].named_modules():
                if isinstance(module, nn.LayerNorm) and not self.ln_share:
                    continue
                source = owner.get_submodule(name)
                for pname, param in list(module._parameters.items()):
                    if param is not None:
                        # the same Parameter object, not a copy: storage and gradients are shared
                        setattr(module, pname, source._parameters[pname])

    @property
    def unique_blocks(self) -> list[nn.Module]:
        """The blocks that own the parameters (depths `owner_depth`): K, or K + 2 for the middle variants."""
        return [self.blocks[d] for d in self.owner_depth]

    @property
    def effective_depth(self) -> int:
        return len(self.schedule)

    @property
    def halting_threshold(self) -> float | None:
        return self._halting_threshold

    @halting_threshold.setter
    def halting_threshold(self, value: float | None) -> None:
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
                raise ValueError(f"halting_threshold must be None or a number >= 0, got {value!r}")
            if self.sharing != "cycle":
                raise ValueError("halting works per recursion step (one pass over the unique blocks); "
                                 f"use sharing='cycle', got {self.sharing!r}")
        self._halting_threshold = None if value is None else float(value)

    # -- forward --

    def _adaptive(self) -> bool:
        return self._halting_threshold is not None

    def _run_blocks(self, x: torch.Tensor) -> BlocksOutput:
        if not self._adaptive():
            self.last_diagnostics = None
            return super()._run_blocks(x)  # the L (tied) blocks in order
        return self._run_recursions(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> RecursionOutput:
        out = super().forward(idx, targets)
        return RecursionOutput(logits=out.logits, loss=out.loss, aux_loss=out.aux_loss,
                               layer_outputs=out.layer_outputs, recursion=self.last_diagnostics)

    # hooks the Mixture-of-Recursions subclass overrides

    def _route_start(self, h0: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """Routing decided once from the stack's input (token choice); returns (state, aux_loss)."""
        return None, h0.new_zeros(())

    def _select(self, r: int, h: torch.Tensor, active: torch.Tensor, state: Any
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(tokens that run step r (B, T) bool ⊆ active, gate weight (B, T) or None (= 1), aux_loss)."""
        return active, None, h.new_zeros(())

    def _route_finish(self, h0: torch.Tensor, h: torch.Tensor, state: Any) -> torch.Tensor:
        return h

    def _run_recursions(self, x: torch.Tensor) -> BlocksOutput:
        """The adaptive-depth loop over recursion steps r = 0..N-1, each one pass over the K unique blocks:

            h <- h + w_t (F_r(h) - h)   for tokens t selected at step r,   h unchanged otherwise,

        with F_r the K blocks at depths r*K .. r*K+K-1 run with attention among the selected tokens
        (recursion-wise) or over step 0's keys/values (KV sharing, r >= 1), and w_t the router's gate (1 if none).
        """
        batch, time, _ = x.shape
        k_unique = self.num_unique
        h0 = h = x
        active = torch.ones(batch, time, dtype=torch.bool, device=x.device)
        depth = torch.zeros(batch, time, dtype=torch.long, device=x.device)
        weights = torch.full((batch, time, self.num_recursion), float("nan"), device=x.device)
        state, aux_loss = self._route_start(h0)
        step0_kv: list[KV] = []
        tokens_per_step: list[int] = []
        kv_entries = 0
        for r in range(self.num_recursion):
            selected, gate, aux = self._select(r, h, active, state)
            aux_loss = aux_loss + aux
            n_selected = int(selected.sum())
            tokens_per_step.append(n_selected)
            if n_selected == 0:
                active = selected
                continue
            share = self.kv_sharing and r > 0
            mask = causal_mask(batch, time, x.device) if share else active_mask(selected)
            y = h
            for j in range(k_unique):
                y, own, aux = block_step(self.blocks[r * k_unique + j], y, attn_mask=mask,
                                         kv=step0_kv[j] if share else None)
                aux_loss = aux_loss + aux
                if r == 0:
                    step0_kv.append(own)
            if not share:
                kv_entries += n_selected * k_unique
            # Δ = F_r(h) - h ;  h <- h + w Δ on the selected tokens
            delta = y - h
            if gate is not None:
                delta = gate.unsqueeze(-1).to(delta.dtype) * delta
                weights[:, :, r] = torch.where(selected, gate.detach().float(), weights[:, :, r])
            else:
                weights[:, :, r] = torch.where(selected, 1.0, weights[:, :, r])
            h_next = torch.where(selected.unsqueeze(-1), h + delta, h)
            keep = selected
            if self._halting_threshold is not None:
                # ρ = ‖Δ‖ / (‖h‖ + ε): a small relative update means the token has converged
                rho = delta.norm(dim=-1) / (h.norm(dim=-1) + HALTING_EPS)
                keep = selected & (rho >= self._halting_threshold)
            h = h_next
            depth = depth + selected.long()
            active = keep
        h = self._route_finish(h0, h, state)
        self.last_diagnostics = RecursionDiagnostics(
            depth=depth, tokens_per_step=tokens_per_step, kv_cache_entries=kv_entries,
            num_tokens=batch * time, router_weights=weights,
        )
        return BlocksOutput(x=h, aux_loss=aux_loss, layer_outputs=[])

    # -- construction from a deeper model --

    @torch.no_grad()
    def _initialize_from(self, vanilla: TinyTransformer, initialization: str) -> None:
        if not isinstance(vanilla, TinyTransformer) or isinstance(vanilla, RecursiveTransformer):
            raise TypeError(f"vanilla must be a plain TinyTransformer, got {type(vanilla).__name__}")
        if vanilla.config != self.config:
            raise ValueError(f"vanilla.config {vanilla.config} differs from the recursive model's {self.config}")
        sources = source_layers(n_layers=self.config.n_layers, num_recursion=self.num_recursion,
                                sharing=self.sharing, initialization=initialization)
        src = vanilla.state_dict()
        for name, param in self.named_parameters(remove_duplicate=False):
            if not name.startswith("blocks.") and name in src:  # routers are the recursive model's own
                param.copy_(src[name])
        for k, layers in enumerate(sources):
            owner = self.owner_depth[k]
            for name, param in self.blocks[owner].named_parameters():
                stacked = torch.stack([src[f"blocks.{d}.{name}"].double() for d in layers])
                # W_k = mean over the source layers (one layer for stepwise / lower / upper)
                param.copy_(stacked.mean(0).to(param.dtype))
        if not self.ln_share:
            for d, block in enumerate(self.blocks):
                for mname, module in block.named_modules():
                    if isinstance(module, nn.LayerNorm):
                        for pname, param in module.named_parameters():
                            param.copy_(src[f"blocks.{d}.{mname}.{pname}"])

    @classmethod
    def from_vanilla(
        cls,
        vanilla: TinyTransformer,
        *,
        num_recursion: int,
        sharing: str = "cycle",
        initialization: str = "stepwise",
        ln_share: bool = True,
        **kwargs: Any,
    ) -> "RecursiveTransformer":
        """A recursive model of the vanilla model's depth L, its K = L / num_recursion unique blocks initialised
        from the vanilla layers (see the module docstring); embeddings, final norm and head are copied. The vanilla
        model is not modified."""
        if initialization not in INITIALIZATIONS:
            raise ValueError(f"initialization must be one of {INITIALIZATIONS}, got {initialization!r}")
        model = cls(vanilla.config, num_recursion=num_recursion, sharing=sharing, ln_share=ln_share, **kwargs)
        model._initialize_from(vanilla, initialization)
        return model
