"""# lablib.recursive: recursive (layer-tied) transformers and adaptive depth

A *recursive* transformer reaches depth L = K · num_recursion with only K unique blocks of parameters (Bae et al.,
*Relaxed Recursive Transformers*, 2024, arXiv:2410.20672; Bae et al., *Mixture-of-Recursions*, 2025,
arXiv:2507.10524). Vocabulary follows the MoR code: `sharing`, `num_recursion`, `initialization`, `ln_share`.

* `core`: `RecursiveTransformer` (CYCLE / SEQUENCE tying of Parameters across L distinct block modules,
  `from_vanilla` with stepwise / average / lower / upper initialisation, relative-norm `halting_threshold`),
  `block_schedule`, `source_layers`, `RecursionDiagnostics`.
* `relaxed`: `RelaxedRecursiveTransformer` (per-depth `lablib.adapters` LoRA, SVD-of-residual init, `rank` knob).
* `mor`: `MixtureOfRecursionsTransformer` (expert-choice with per-step capacities or token-choice routing over
  depths; `kv_strategy` "recursion_wise" or "kv_sharing").
* `generation`: `generate_cached` (KV-cache decoding equal to the cache-free `models.generate`).
* `mod`: `MixtureOfDepthsTransformer` (Raposo et al., 2024: capacity-limited token skipping per block).
* `accounting`: `recursion_ledger` (parameters once, FLOPs per token spent, KV-cache size).
"""

from lablib.recursive.accounting import RecursionLedger, matmul_flops, recursion_ledger, step_fractions
from lablib.recursive.core import (
    INITIALIZATIONS,
    SHARINGS,
    RecursionDiagnostics,
    RecursionOutput,
    RecursiveTransformer,
    block_schedule,
    check_depth,
    source_layers,
)
from lablib.recursive.engine import KV, active_mask, block_step, causal_mask
from lablib.recursive.generation import GenerationResult, generate_cached
from lablib.recursive.mod import MixtureOfDepthsTransformer
from lablib.recursive.mor import (
    KV_STRATEGIES,
    ROUTINGS,
    MixtureOfRecursionsTransformer,
    check_capacities,
    default_capacities,
    tokens_at_step,
)
from lablib.recursive.relaxed import RelaxedRecursiveTransformer, rank_parameters

__all__ = [
    "INITIALIZATIONS", "SHARINGS", "KV_STRATEGIES", "ROUTINGS", "KV",
    "RecursiveTransformer", "RelaxedRecursiveTransformer", "MixtureOfRecursionsTransformer",
    "MixtureOfDepthsTransformer", "RecursionDiagnostics", "RecursionOutput", "RecursionLedger", "GenerationResult",
    "block_schedule", "check_depth", "source_layers", "block_step", "active_mask", "causal_mask",
    "generate_cached", "recursion_ledger", "matmul_flops", "step_fractions", "rank_parameters",
    "check_capacities", "default_capacities", "tokens_at_step",
]
