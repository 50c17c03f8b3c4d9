"""`lablib.sparse`: sparse masks, from one-shot pruning to learned N:M masks, fixed sparse fine-tuning and grafting.

A `Mask` maps parameter names to boolean tensors (True = keep); `density` is the kept fraction (sparsity =
1 - density) and `n`, `m` name an N:M pattern. Every mask builder returns a dataclass with the mask, its per-tensor
density and kept counts (`MaskStats`), the scores it ranked by and a mask-aware `lablib.ledger` row
(`masked_ledger`). Nothing modifies the model you pass unless its name ends in `_` (`apply_`, `attach_`, `remove_`,
`to_semi_structured_`); trainers return a trained copy.

* `masks`: `Mask` (apply / apply_ / attach_ + remove_ / stats / save + load as safetensors), `mask_from_scores`,
  `masked_ledger`, `masked_train` (training with pruned entries held at exactly 0).
* `pruning`: magnitude pruning, layer-wise and global ([Han et al. 2015](https://arxiv.org/abs/1506.02626)); Wanda
  ([Sun et al. 2023, *A Simple and Effective Pruning Approach for Large Language Models*](https://arxiv.org/abs/2306.11695)).
* `nm`: N:M semi-structured masks along the input dimension, and torch's 2:4 sparse kernels where the device has them
  ([Mishra et al. 2021, *Accelerating Sparse Deep Neural Networks*](https://arxiv.org/abs/2104.08378)).
* `maskllm`: learned N:M masks, a Gumbel-softmax over the C(m, n) candidate patterns of every group
  ([Fang et al. 2024, *MaskLLM*](https://arxiv.org/abs/2409.17481)).
* `fish`: FISH masks by diagonal Fisher information and fine-tuning only those entries
  ([Sung, Nair & Raffel 2021, *Training Neural Networks with Fixed Sparse Masks*](https://arxiv.org/abs/2111.09839)).
* `grafting`: skill localization by grafting fine-tuned weights onto the base
  ([Panigrahi et al. 2023, *Task-Specific Skill Localization in Fine-tuned Language Models*](https://arxiv.org/abs/2302.06600)).
* `retrain`: PERP (retrain biases and norms after pruning; [Zimmer et al. 2023](https://arxiv.org/abs/2312.15230)) and
  iterative magnitude pruning with rewinding ([Frankle & Carbin 2019, *The Lottery Ticket
  Hypothesis*](https://arxiv.org/abs/1803.03635); [Frankle et al. 2020](https://arxiv.org/abs/1912.05580)).

```python
from lablib import sparse
result = sparse.magnitude_mask(model, density=0.5, scope="global")
print(result.stats.overall_density, result.ledger.stored)
sparse_model = result.mask.apply(model)            # a masked copy; `model` untouched
trained = sparse.masked_train(model, mask=result.mask, batches=batches, loss_fn=loss_fn, steps=200)
two_four = sparse.nm_mask(model, n=2, m=4).mask    # every group of 4 inputs keeps exactly 2
```
"""

from __future__ import annotations

from lablib.sparse.fish import DeltaParametrization, fish_mask, fisher_diagonal, sparse_finetune
from lablib.sparse.grafting import GraftParametrization, GraftResult, graft, learned_graft
from lablib.sparse.maskllm import LearnedNMParametrization, LearnedNMResult, learned_nm_mask, prior_logits
from lablib.sparse.masks import (
    SCOPES,
    Mask,
    MaskParametrization,
    MaskResult,
    MaskStats,
    SparseTrainResult,
    attached_mask,
    check_density,
    global_top_k,
    kept_count,
    mask_from_scores,
    masked_ledger,
    masked_train,
    norm_and_bias_names,
    parameter_names,
    prunable_names,
)
from lablib.sparse.nm import (
    SemiStructuredResult,
    check_nm,
    is_nm_mask,
    nm_mask,
    nm_mask_from_scores,
    nm_patterns,
    semi_structured_support,
    to_semi_structured,
    to_semi_structured_,
)
from lablib.sparse.pruning import WandaResult, collect_input_norms, default_forward, magnitude_mask, wanda_mask
from lablib.sparse.retrain import LotteryResult, LotteryRound, lottery_ticket, perp_retrain

__all__ = [
    "SCOPES",
    "DeltaParametrization",
    "GraftParametrization",
    "GraftResult",
    "LearnedNMParametrization",
    "LearnedNMResult",
    "LotteryResult",
    "LotteryRound",
    "Mask",
    "MaskParametrization",
    "MaskResult",
    "MaskStats",
    "SemiStructuredResult",
    "SparseTrainResult",
    "WandaResult",
    "attached_mask",
    "check_density",
    "check_nm",
    "collect_input_norms",
    "default_forward",
    "fish_mask",
    "fisher_diagonal",
    "global_top_k",
    "graft",
    "is_nm_mask",
    "kept_count",
    "learned_graft",
    "learned_nm_mask",
    "lottery_ticket",
    "magnitude_mask",
    "mask_from_scores",
    "masked_ledger",
    "masked_train",
    "nm_mask",
    "nm_mask_from_scores",
    "nm_patterns",
    "norm_and_bias_names",
    "parameter_names",
    "perp_retrain",
    "prior_logits",
    "prunable_names",
    "semi_structured_support",
    "sparse_finetune",
    "to_semi_structured",
    "to_semi_structured_",
    "wanda_mask",
]
