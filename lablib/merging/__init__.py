"""`lablib.merging`: merge fine-tuned models into one, as functions over state dicts.

Every method takes a base state dict (or None where it needs none) and a list of fine-tuned state dicts with the same
keys, shapes and dtypes (`Mapping[str, Tensor]`, so any torch model, a Hugging Face one included, works) and returns
a new state dict; inputs are never modified, dtypes are kept, and a mismatch raises `StateDictMismatchError` naming
the key. One registry, `MERGE_METHODS`, holds them under mergekit's names where mergekit has the method:

* `linear`: weight averaging Σ w_t θ_t / Σ w_t. Wortsman et al., *Model soups*, ICML 2022
  ([arXiv:2203.05482](https://arxiv.org/abs/2203.05482)).
* `task_arithmetic`: θ_0 + λ Σ w_t τ_t with task vectors τ_t = θ_t − θ_0. Ilharco et al., *Editing Models with Task
  Arithmetic*, ICLR 2023 ([arXiv:2212.04089](https://arxiv.org/abs/2212.04089)).
* `magnitude_prune` (PEFT's name): task arithmetic on top-density trimmed task vectors (TIES's trim alone).
* `ties`: trim, elect the sign by total mass, disjoint mean. Yadav et al., *TIES-Merging: Resolving Interference
  When Merging Models*, NeurIPS 2023 ([arXiv:2306.01708](https://arxiv.org/abs/2306.01708)).
* `dare_linear`, `dare_ties`: drop with p = 1 − density and rescale 1/(1 − p), then task arithmetic or TIES.
  Yu et al., *Language Models are Super Mario*, ICML 2024 ([arXiv:2311.03099](https://arxiv.org/abs/2311.03099)).
* `darex_q`: DARE with the rescale 1/q. Deng et al., *DARE the Extreme*, ICLR 2025
  ([arXiv:2410.09344](https://arxiv.org/abs/2410.09344)).
* `fisher`: Σ w_m F_m θ_m / Σ w_m F_m with a diagonal Fisher from `diagonal_fisher`. Matena & Raffel, *Merging
  Models with Fisher-Weighted Averaging*, NeurIPS 2022 ([arXiv:2111.09832](https://arxiv.org/abs/2111.09832)).
* `pcb`: intra- and inter-balancing scores, drop, score-weighted mean. Du et al., *Parameter Competition Balancing
  for Model Merging*, NeurIPS 2024 ([arXiv:2410.02396](https://arxiv.org/abs/2410.02396)).
* `iso_c`, `iso_cts`: flatten the singular spectrum of Σ τ_t (plus task-specific subspaces). Marczak et al., *No
  Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces*, ICML 2025
  ([arXiv:2502.04959](https://arxiv.org/abs/2502.04959)).

Beside the registry: permutation alignment of two MLPs by weight matching and the loss along the line between two
models (Ainsworth et al., *Git Re-Basin*, ICLR 2023, [arXiv:2209.04836](https://arxiv.org/abs/2209.04836)); the
primitives under PEFT's names (`prune`, `calculate_majority_sign_mask`, `disjoint_merge`); FusionBench's
`state_dict_sub/add/mul`; a mergekit YAML export; and a FusionBench-style `run(pool)`.

Where PEFT, mergekit and the papers' code compute TIES and DARE differently, each difference is an option and
`convention="peft" | "mergekit" | "official"` picks a consistent set (table in `lablib.merging.methods`).
`wemoe` (Tang et al., *Merging Multi-Task Models via Weight-Ensembling Mixture of Experts*, ICML 2024,
[arXiv:2402.00433](https://arxiv.org/abs/2402.00433)) merges everything but the MLPs by task arithmetic and turns each
MLP into an input-routed ensemble over the task vectors, with a `lablib.moe` router trained by `train_wemoe_router`.
`merge_safetensors` merges safetensors checkpoints (files or folders of shards) one tensor at a time, equal to the
in-memory merge; `python -m lablib merge --method ties --base B --models A1 A2 --out DIR` is its command line.

```python
from lablib import merging
merged = merging.merge("ties", base.state_dict(), [a.state_dict(), b.state_dict()], density=0.2, lambda_=1.0)
model.load_state_dict(merged)
print(merging.to_mergekit_yaml("ties", {"density": 0.2}, ["org/task-a", "org/task-b"], base_model="org/base"))
```
"""

from __future__ import annotations

from lablib.merging.core import (
    MERGE_METHODS,
    METHOD_INFO,
    PARAMETER_ALIASES,
    MergePlan,
    MethodInfo,
    StateDict,
    StateDictMismatchError,
    merge,
    merge_method,
    method_parameters,
    plan_merge,
    state_dict_add,
    state_dict_mul,
    state_dict_sub,
    task_vectors,
)
from lablib.merging.fisher import FISHER_LABELS, diagonal_fisher, fisher
from lablib.merging.interop import PRETRAINED, MergeAlgorithm, ModelPool, run, to_mergekit_yaml
from lablib.merging.isotropic import iso_c, iso_c_matrix, iso_cts, iso_cts_matrix, iso_cts_ranks, polar_factor
from lablib.merging.methods import (
    CONVENTIONS,
    DARExQSearch,
    PCBScores,
    TaskArithmeticOptions,
    dare_linear,
    dare_ties,
    darex_q,
    darex_q_search,
    key_generator,
    linear,
    magnitude_prune,
    pcb,
    pcb_scores,
    resolve_options,
    task_arithmetic,
    ties,
)
from lablib.merging.permutation import (
    InterpolationCurve,
    WeightMatchingResult,
    interpolate,
    interpolation_curve,
    mlp_layers,
    permute_hidden_units,
    weight_matching,
)
from lablib.merging.wemoe import WeightEnsemblingMoE, WEMoETraining, train_wemoe_router, wemoe, wemoe_modules
from lablib.merging.streaming import STREAMABLE, StreamingMergeReport, merge_safetensors
from lablib.merging.primitives import (
    RESCALE_NORMS,
    calculate_majority_sign_mask,
    disjoint_merge,
    elect_sign,
    magnitude_mask,
    prune,
    random_mask,
    rescale_to_norm,
    threshold_mask,
)

__all__ = [
    # registry and contract
    "MERGE_METHODS",
    "METHOD_INFO",
    "PARAMETER_ALIASES",
    "MethodInfo",
    "MergePlan",
    "StateDict",
    "StateDictMismatchError",
    "merge",
    "merge_method",
    "method_parameters",
    "plan_merge",
    # state-dict arithmetic
    "state_dict_add",
    "state_dict_mul",
    "state_dict_sub",
    "task_vectors",
    # methods
    "CONVENTIONS",
    "TaskArithmeticOptions",
    "resolve_options",
    "linear",
    "task_arithmetic",
    "magnitude_prune",
    "ties",
    "dare_linear",
    "dare_ties",
    "darex_q",
    "DARExQSearch",
    "darex_q_search",
    "key_generator",
    "pcb",
    "pcb_scores",
    "PCBScores",
    "FISHER_LABELS",
    "diagonal_fisher",
    "fisher",
    "iso_c",
    "iso_cts",
    "iso_c_matrix",
    "iso_cts_matrix",
    "iso_cts_ranks",
    "polar_factor",
    # primitives (PEFT's names)
    "RESCALE_NORMS",
    "prune",
    "magnitude_mask",
    "threshold_mask",
    "random_mask",
    "rescale_to_norm",
    "elect_sign",
    "calculate_majority_sign_mask",
    "disjoint_merge",
    # permutation alignment
    "mlp_layers",
    "permute_hidden_units",
    "WeightMatchingResult",
    "weight_matching",
    "interpolate",
    "InterpolationCurve",
    "interpolation_curve",
    # WEMoE
    "WeightEnsemblingMoE",
    "WEMoETraining",
    "wemoe",
    "wemoe_modules",
    "train_wemoe_router",
    # streaming safetensors merge
    "STREAMABLE",
    "StreamingMergeReport",
    "merge_safetensors",
    # interop
    "PRETRAINED",
    "to_mergekit_yaml",
    "ModelPool",
    "MergeAlgorithm",
    "run",
]
