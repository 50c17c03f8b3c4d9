"""The recursion engine: one pass of a block with an explicit attention mask and explicit keys/values.

`models.Block.forward` attends over every earlier token (`is_causal=True`). Adaptive depth needs two more things:

* attention restricted to the tokens still *active* at a recursion step (Mixture-of-Recursions' recursion-wise
  caching, halting), i.e. a key mask `allowed[b, s]` on top of the causal mask;
* keys/values that come from somewhere else (recursive KV sharing reuses the first recursion's K/V).

`block_step` recomputes a default block (`CausalSelfAttention` + any FFN) from its own submodules with those two
options; `tests/test_recursive.py` checks it against `Block.forward` with everything allowed. Every call goes through
the block's submodules (`attn.qkv`, `attn.proj`, `ffn`), so LoRA wrappers attached per depth take part.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lablib.models import Block, unpack_module_output


@dataclass
class KV:
    """Keys and values of one attention layer: (B, n_heads, S, d_head) each."""

    k: torch.Tensor
    v: torch.Tensor


def _check_block(block: nn.Module) -> None:
    attn = getattr(block, "attn", None)
    if not isinstance(block, Block) or not all(hasattr(attn, a) for a in ("qkv", "proj", "n_heads")):
        raise TypeError(
            "adaptive-depth recursion recomputes attention itself and needs models.Block with the default "
            f"CausalSelfAttention (qkv, proj, n_heads); got {type(block).__name__} with {type(attn).__name__}"
        )


def split_heads(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, T, d_model) -> (B, n_heads, T, d_head)."""
    batch, time, d_model = t.shape
    return t.view(batch, time, n_heads, d_model // n_heads).transpose(1, 2)


def block_step(
    block: Block,
    x: torch.Tensor,
    *,
    attn_mask: torch.Tensor,
    kv: KV | None = None,
    past: KV | None = None,
) -> tuple[torch.Tensor, KV, torch.Tensor]:
    """One pre-LN block on x (B, T, d) with a boolean `attn_mask` (B, T, S) of the keys each query may see.

    * `kv=None`: keys/values are computed from x (S = T, or S = S_past + T when `past` is given: then they are
      appended to `past`, the KV-cache step).
    * `kv` given: those keys/values are used instead (recursive KV sharing), S = their length.
    Returns (new x, this layer's own K/V computed from x, aux_loss of the FFN).
    """
    _check_block(block)
    attn = block.attn
    n_heads = attn.n_heads
    batch, time, d_model = x.shape
    a = block.attn_norm(x)
    # (B, T, 3 d) -> q, k, v each (B, n_heads, T, d_head)
    q, k, v = (split_heads(t, n_heads) for t in attn.qkv(a).split(d_model, dim=2))
    own = KV(k=k, v=v)
    if kv is not None:
        keys, values = kv.k, kv.v
    elif past is not None:
        keys, values = torch.cat([past.k, k], dim=2), torch.cat([past.v, v], dim=2)
    else:
        keys, values = k, v
    if attn_mask.shape != (batch, time, keys.shape[2]):
        raise ValueError(f"attn_mask must have shape {(batch, time, keys.shape[2])}, got {tuple(attn_mask.shape)}")
    drop = attn.dropout if attn.training else 0.0
    # softmax(q kᵀ / sqrt(d_head) + mask) v over the allowed keys only : (B, n_heads, T, d_head)
    y = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask[:, None], dropout_p=drop)
    y = y.transpose(1, 2).contiguous().view(batch, time, d_model)
    x = x + attn.resid_dropout(attn.proj(y))
    raw = block.ffn(block.ffn_norm(x))
    ffn_y, aux = unpack_module_output(raw, like=x, where="ffn module")
    aux = x.new_zeros(()) if aux is None else aux
    return x + ffn_y, own, aux


def active_mask(active: torch.Tensor) -> torch.Tensor:
    """(B, T) bool of active tokens -> (B, T, T) mask: query t sees active s <= t, and itself (so an inactive
    query's row is never empty; its output is discarded)."""
    time = active.shape[1]
    causal = torch.ones(time, time, dtype=torch.bool, device=active.device).tril()
    eye = torch.eye(time, dtype=torch.bool, device=active.device)
    return causal[None] & (active[:, None, :] | eye[None])


def causal_mask(batch: int, time: int, device: torch.device) -> torch.Tensor:
    """(B, T, T): every earlier token and itself."""
    return torch.ones(time, time, dtype=torch.bool, device=device).tril()[None].expand(batch, time, time)
