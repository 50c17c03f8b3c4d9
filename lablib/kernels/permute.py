"""Token permutation for grouped MoE matmuls: sort the (token, slot) assignments by expert, pad each expert's group
to a multiple of the tile height `block_m`, and undo it.

An MoE layer with N tokens and top-k routing makes M = N·k assignments; assignment a = t·k + s sends token t = a // k
to expert e_a = indices[t, s]. A grouped GEMM wants each expert's rows contiguous, and a tiled kernel wants every
tile of `block_m` rows to belong to one expert (so a tile loads one weight matrix). So (vLLM's `moe_align_block_size`,
MegaBlocks' `round_up` + `padded_gather`):

    counts_e        = #{a : e_a = e}                      (bincount)
    padded_e        = ⌈counts_e / block_m⌉ · block_m        (each group rounded up to whole tiles)
    sorted_ids      = [assignments of expert 0 (ascending), M, M, ..., assignments of expert 1, ...]   (length Σ padded_e)
    block_expert[b] = the expert of tile b

The sentinel M marks a padding row: the kernels load zeros for it and never store it. Inside an expert the
assignments keep their original order (a stable sort), so the result does not depend on the sort algorithm.
The padding is the price of one-expert-per-tile: `Permutation.padding` rows of wasted work, less than `block_m`
per non-empty expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Permutation", "sort_assignments", "inverse_permutation", "padded_counts", "padding_fraction"]


def _check_block_m(block_m: object) -> int:
    if isinstance(block_m, bool) or not isinstance(block_m, int) or block_m < 1:
        raise ValueError(f"block_m must be a positive int, got {block_m!r}")
    return block_m


def padded_counts(counts: torch.Tensor, block_m: int) -> torch.Tensor:
    """padded_e = ⌈counts_e / block_m⌉ · block_m for each expert (0 stays 0)."""
    _check_block_m(block_m)
    counts = torch.as_tensor(counts, dtype=torch.int64)
    if counts.dim() != 1 or bool((counts < 0).any()):
        raise ValueError(f"counts must be a 1-D tensor of non-negative ints, got {counts.tolist()!r}")
    return (counts + block_m - 1) // block_m * block_m


def padding_fraction(counts: torch.Tensor, block_m: int) -> float:
    """Share of the padded rows that are padding: (Σ padded_e − Σ counts_e) / Σ padded_e (0 when nothing is routed)."""
    counts = torch.as_tensor(counts, dtype=torch.int64)
    padded = padded_counts(counts, block_m)
    total = int(padded.sum())
    return 0.0 if total == 0 else (total - int(counts.sum())) / total


@dataclass(frozen=True)
class Permutation:
    """The expert-sorted, tile-padded layout of M = num_tokens · top_k assignments.

    * `sorted_ids` (P,) int64: assignment id per padded row, `num_assignments` (the sentinel) on padding rows.
    * `block_expert` (P / block_m,) int64: the expert of each tile.
    * `counts`, `padded` (E,) int64: assignments per expert, before and after rounding up to whole tiles.
    * `expert_offsets` (E + 1,) int64: first padded row of each expert (the last entry is P).
    """

    sorted_ids: torch.Tensor
    block_expert: torch.Tensor
    counts: torch.Tensor
    padded: torch.Tensor
    expert_offsets: torch.Tensor
    num_assignments: int
    top_k: int
    block_m: int

    @property
    def num_experts(self) -> int:
        return int(self.counts.numel())

    @property
    def padded_rows(self) -> int:
        """P = Σ padded_e, a multiple of block_m."""
        return int(self.sorted_ids.numel())

    @property
    def padding(self) -> int:
        """Rows computed for nothing: P − (kept assignments)."""
        return self.padded_rows - int(self.counts.sum())

    @property
    def valid(self) -> torch.Tensor:
        """(P,) bool, True on rows that hold a real assignment."""
        return self.sorted_ids < self.num_assignments

    @property
    def token_of_row(self) -> torch.Tensor:
        """(P,) int64 token t = a // k of each row; padding rows point at token 0 (mask them with `valid`)."""
        return torch.where(self.valid, self.sorted_ids // self.top_k, torch.zeros_like(self.sorted_ids))


def sort_assignments(
    indices: torch.Tensor, *, num_experts: int, block_m: int, mask: torch.Tensor | None = None
) -> Permutation:
    """Sort the assignments of `indices` (N, k) by expert into tiles of `block_m` rows (see the module docstring).

    `mask` (N, k) bool drops assignments (capacity, router masks): they appear in no tile. Raises ValueError for a
    non-integer or non-2-D `indices`, ids outside [0, num_experts), a mask of another shape, or a bad block_m.
    """
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    _check_block_m(block_m)
    if not isinstance(indices, torch.Tensor) or indices.dim() != 2:
        raise ValueError(f"indices must be a 2-D (num_tokens, top_k) tensor, got "
                         f"{getattr(indices, 'shape', type(indices).__name__)}")
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise ValueError(f"indices must hold integer expert ids, got dtype {indices.dtype}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_experts):
        raise ValueError(f"expert ids must lie in [0, {num_experts}), got min {int(indices.min())} "
                         f"max {int(indices.max())}")
    if mask is not None and (mask.shape != indices.shape or mask.dtype != torch.bool):
        raise ValueError(f"mask must be a bool tensor of shape {tuple(indices.shape)}, got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    device = indices.device
    num_tokens, top_k = indices.shape
    num_assignments = num_tokens * top_k
    # a = t·k + s and its expert e_a : (M,)
    ids = torch.arange(num_assignments, device=device)
    expert = indices.reshape(-1).to(torch.int64)
    if mask is not None:
        keep = mask.reshape(-1)
        ids, expert = ids[keep], expert[keep]
    # stable sort: inside one expert the assignments stay in ascending a : (M_kept,)
    order = torch.argsort(expert, stable=True)
    ids, expert = ids[order], expert[order]
    counts = torch.bincount(expert, minlength=num_experts)
    padded = padded_counts(counts, block_m)
    zero = torch.zeros(1, dtype=torch.int64, device=device)
    expert_offsets = torch.cat([zero, padded.cumsum(0)])
    count_offsets = torch.cat([zero, counts.cumsum(0)])
    # row of the j-th sorted assignment: its expert's padded start + its rank inside the expert
    rank = torch.arange(ids.numel(), device=device) - count_offsets[expert]
    rows = expert_offsets[expert] + rank
    total = int(expert_offsets[-1])
    sorted_ids = torch.full((total,), num_assignments, dtype=torch.int64, device=device)
    sorted_ids[rows] = ids
    block_expert = torch.repeat_interleave(torch.arange(num_experts, device=device), padded // block_m)
    return Permutation(sorted_ids=sorted_ids, block_expert=block_expert, counts=counts, padded=padded,
                       expert_offsets=expert_offsets, num_assignments=num_assignments, top_k=top_k, block_m=block_m)


def inverse_permutation(perm: Permutation) -> torch.Tensor:
    """(M,) int64: the padded row of each assignment a, or −1 for an assignment that was masked out.

    `rows_in_sorted[inverse[a]] == rows_in_assignment_order[a]`: gathering the sorted buffer with it undoes the sort.
    """
    inverse = torch.full((perm.num_assignments,), -1, dtype=torch.int64, device=perm.sorted_ids.device)
    valid = perm.valid
    inverse[perm.sorted_ids[valid]] = torch.nonzero(valid).reshape(-1)
    return inverse
