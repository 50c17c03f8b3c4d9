"""Autoregressive decoding with a KV cache for recursive models, Mixture-of-Recursions included.

`generate_cached` feeds one token at a time (the prompt too) and keeps, per (recursion step r, unique layer j), the
keys/values of the tokens that ran there (`kv_strategy="recursion_wise"`), or only step 0's (`"kv_sharing"`: steps
r >= 1 read them). Routing and halting decisions come from the model's own hooks on the new token's state, which is
a function of earlier tokens only, so the cached run reproduces the full-sequence forward: `models.generate` (which
recomputes the whole context every token) gives the same tokens (tested). Expert-choice routing must be causal
(`causal_routing=True`): top-k over a sequence depends on tokens not generated yet.
"""

from __future__ import annotations

import time as _time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lablib.recursive.core import HALTING_EPS, RecursiveTransformer
from lablib.recursive.engine import KV, block_step


@dataclass
class LayerCache:
    """One (step, layer)'s cache: keys/values (B, n_heads, S, d_head) and which entries are real (B, S)."""

    kv: KV
    valid: torch.Tensor


@dataclass
class GenerationResult:
    """`tokens` (B, T0 + new); `depth` (B, T0 + new) recursion steps each token ran; `kv_cache_entries`: (token,
    layer) key/value pairs held at the end, summed over the batch; `kv_cache_bytes` = entries · 2 · d_model · element
    size; `seconds`: wall time of the decoding loop."""

    tokens: torch.Tensor
    depth: torch.Tensor
    kv_cache_entries: int
    kv_cache_bytes: int
    seconds: float
    entries_by_step: list[int] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens.numel() / self.seconds if self.seconds > 0 else float("inf")


def _check(model: RecursiveTransformer, idx: torch.Tensor, max_new_tokens: int, temperature: float) -> None:
    if not isinstance(model, RecursiveTransformer):
        raise TypeError("generate_cached needs a RecursiveTransformer (a vanilla model is "
                        f"RecursiveTransformer.from_vanilla(model, num_recursion=1)), got {type(model).__name__}")
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype != torch.long or idx.shape[1] < 1:
        got = f"shape {tuple(idx.shape)}, dtype {idx.dtype}" if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise ValueError(f"idx must be an int64 tensor of shape (batch, time >= 1), got {got}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if idx.shape[1] + max_new_tokens > model.config.seq_len:
        raise ValueError(f"prompt ({idx.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds seq_len "
                         f"{model.config.seq_len}: the cache does not slide its window")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if model.sharing.startswith("middle_"):
        raise ValueError(f"generate_cached walks num_recursion x num_unique depths; {model.sharing!r} adds a first and "
                         "a last layer it does not handle (use models.generate)")
    if getattr(model, "routing", None) == "expert_choice" and not model.causal_routing:
        raise ValueError("expert-choice top-k looks at future tokens; set model.causal_routing = True to generate "
                         "(a token continues iff its router logit > 0)")


@torch.no_grad()
def _step(model: RecursiveTransformer, token: torch.Tensor, position: int, caches: dict[tuple[int, int], LayerCache]
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, vocab) and depth (B,) for one new token (B,) at `position`, updating `caches` in place."""
    batch = token.shape[0]
    device = token.device
    pos = torch.full((1,), position, dtype=torch.long, device=device)
    # x_0 = E_tok[token] + E_pos[position] : (B, 1, d)
    h = model.token_embedding(token)[:, None, :] + model.position_embedding(pos)[None]
    h0 = h
    active = torch.ones(batch, 1, dtype=torch.bool, device=device)
    depth = torch.zeros(batch, dtype=torch.long, device=device)
    state, _ = model._route_start(h0)
    k_unique = model.num_unique
    for r in range(model.num_recursion):
        selected, gate, _ = model._select(r, h, active, state)
        if not bool(selected.any()):
            active = selected
            continue
        share = model.kv_sharing and r > 0
        y = h
        for j in range(k_unique):
            block = model.blocks[r * k_unique + j]
            if share:
                cache = caches[(0, j)]
                mask = cache.valid[:, None, :]
                y, _, _ = block_step(block, y, attn_mask=mask, kv=cache.kv)
                continue
            cache = caches.get((r, j))
            # the new token always sees itself; earlier tokens only where they ran this step
            here = torch.ones(batch, 1, dtype=torch.bool, device=device)
            valid = here if cache is None else torch.cat([cache.valid, here], dim=1)
            y, own, _ = block_step(block, y, attn_mask=valid[:, None, :], past=None if cache is None else cache.kv)
            new_kv = own if cache is None else KV(k=torch.cat([cache.kv.k, own.k], 2),
                                                  v=torch.cat([cache.kv.v, own.v], 2))
            stored = selected if cache is None else torch.cat([cache.valid, selected], dim=1)
            caches[(r, j)] = LayerCache(kv=new_kv, valid=stored)
        delta = y - h
        if gate is not None:
            delta = gate.unsqueeze(-1).to(delta.dtype) * delta
        keep = selected
        if model.halting_threshold is not None:
            rho = delta.norm(dim=-1) / (h.norm(dim=-1) + HALTING_EPS)
            keep = selected & (rho >= model.halting_threshold)
        h = torch.where(selected.unsqueeze(-1), h + delta, h)
        depth = depth + selected[:, 0].long()
        active = keep
    h = model._route_finish(h0, h, state)
    logits = model.lm_head(model.final_norm(h))[:, -1, :]
    return logits, depth


@torch.no_grad()
def generate_cached(
    model: RecursiveTransformer,
    idx: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> GenerationResult:
    """Decode `max_new_tokens` after `idx` (B, T0) with a KV cache; sampling as `models.generate` (greedy at
    temperature 0). The model is put in eval mode and its mode restored; `idx` is not modified."""
    _check(model, idx, max_new_tokens, temperature)
    was_training = model.training
    model.eval()
    start = _time.perf_counter()
    try:
        caches: dict[tuple[int, int], LayerCache] = {}
        out = idx.clone()
        depths = []
        logits = None
        for t in range(idx.shape[1]):
            logits, depth = _step(model, idx[:, t], t, caches)
            depths.append(depth)
        for _ in range(max_new_tokens):
            scores = logits.float()
            if temperature == 0:
                next_token = scores.argmax(dim=-1, keepdim=True)
            else:
                scores = scores / temperature
                if top_k is not None:
                    kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]
                    scores = scores.masked_fill(scores < kth, float("-inf"))
                next_token = torch.multinomial(F.softmax(scores, dim=-1), num_samples=1, generator=generator)
            out = torch.cat([out, next_token], dim=1)
            # the new token runs too, so `depth` and the cache cover the whole output
            logits, depth = _step(model, next_token[:, 0], out.shape[1] - 1, caches)
            depths.append(depth)
    finally:
        model.train(was_training)
    seconds = _time.perf_counter() - start
    by_step = [0] * model.num_recursion
    for (r, _j), cache in caches.items():
        by_step[r] += int(cache.valid.sum())
    entries = sum(by_step)
    element = model.token_embedding.weight.element_size()
    return GenerationResult(tokens=out, depth=torch.stack(depths, dim=1), kv_cache_entries=entries,
                            kv_cache_bytes=entries * 2 * model.config.d_model * element, seconds=seconds,
                            entries_by_step=by_step)
