"""`lablib.kernels`: the MoE expert computation as a plain-torch specification and as Triton grouped-GEMM kernels.

* `reference`: `moe_experts_reference`, the oracle (route -> group by expert -> per-expert matmuls -> weighted
  scatter back), written the slow, obvious way.
* `permute`: `sort_assignments` (token-expert pairs sorted by expert, each expert padded to whole tiles of
  `block_m` rows), `inverse_permutation`, `padding_fraction`.
* `triton_moe` (imported on first use, because importing it imports Triton and, without CUDA, sets
  `TRITON_INTERPRET=1`): the grouped-GEMM kernels, forward and backward, `moe_experts_triton`, and the expert
  backend that `lablib.moe` loads for `backend="triton"`.

`backend="auto"` (registered by `lablib.moe`) picks `"triton"` for CUDA tensors and `"torch"` elsewhere.

Papers and code: ScatterMoE (Tan et al. 2024, [arXiv:2403.08245](https://arxiv.org/abs/2403.08245)); MegaBlocks
(Gale et al. 2022, [arXiv:2211.15841](https://arxiv.org/abs/2211.15841)); vLLM's `fused_moe_kernel`; the Triton
matmul tutorial.
"""

from __future__ import annotations

from lablib.kernels.permute import (
    Permutation,
    inverse_permutation,
    padded_counts,
    padding_fraction,
    sort_assignments,
)
from lablib.kernels.reference import ACTIVATIONS, expert_ffn, moe_experts_reference

__all__ = [
    "ACTIVATIONS",
    "expert_ffn",
    "moe_experts_reference",
    "Permutation",
    "sort_assignments",
    "inverse_permutation",
    "padded_counts",
    "padding_fraction",
]
