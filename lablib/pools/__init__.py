"""`lablib.pools`: shared parameter and expert pools (lab 02).

* `unipool`: UniPool, one global expert pool for every MoE layer (`ExpertPool`, `PoolMoELayer`, `NormRouter`,
  `pool_balance_loss`, `UniPoolTransformer`, `pool_usage`). Huang et al., *UniPool: A Globally Shared Expert Pool
  for Mixture-of-Experts*.
* `widenet`: WideNet, one block (attention + MoE FFN) shared across depth with per-depth LayerNorms
  (`WideNetTransformer`). Xue et al., *Go Wider Instead of Deeper* ([arXiv:2107.11817](https://arxiv.org/abs/2107.11817)).
* `rps`: randomized parameter sharing, every weight read from one hashed array (`RandomizedSharing`, with
  STABLE-RPS's RANDOMFOLD mapping and gradient scaling, or ROAST-style chunks). Desai & Shrivastava, *In defense of
  parameter sharing for model-compression* ([arXiv:2310.11611](https://arxiv.org/abs/2310.11611)).
* `unified_embedding`: feature multiplexing, several categorical features in one hashed table (`UnifiedEmbedding`,
  `make_click_data`, `ClickModel`). Coleman et al., *Unified Embedding* ([arXiv:2305.12102](https://arxiv.org/abs/2305.12102)).

Every model here counts itself through `lablib.ledger`: a pool's experts and the RPS memory are stored once.

```python
from lablib import models, pools
config = models.TransformerConfig(d_model=64, n_layers=4, n_heads=4, seq_len=64)
model = pools.UniPoolTransformer(config, pool_size=8, top_k=2)     # 8 experts for all 4 layers
out = model(idx, targets)              # out.aux_loss includes 0.01 · L_pool
```
"""

from __future__ import annotations

from lablib.pools.rps import MAPPINGS, RandomizedSharing, check_compression, memory_size_for
from lablib.pools.unified_embedding import (
    HASH_PRIME,
    ClickData,
    ClickModel,
    UnifiedEmbedding,
    hash_rows,
    make_click_data,
)
from lablib.pools.unipool import (
    ExpertPool,
    NormRouter,
    PoolMoELayer,
    PoolMoEOutput,
    UniPoolTransformer,
    pool_balance_loss,
    pool_loss_of,
    pool_usage,
)
from lablib.pools.widenet import WideNetTransformer

__all__ = [
    "NormRouter",
    "ExpertPool",
    "PoolMoELayer",
    "PoolMoEOutput",
    "UniPoolTransformer",
    "pool_balance_loss",
    "pool_loss_of",
    "pool_usage",
    "WideNetTransformer",
    "MAPPINGS",
    "RandomizedSharing",
    "check_compression",
    "memory_size_for",
    "HASH_PRIME",
    "hash_rows",
    "UnifiedEmbedding",
    "ClickData",
    "make_click_data",
    "ClickModel",
]
