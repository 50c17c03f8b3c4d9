"""After pruning: retrain a tiny set of parameters (PERP), or prune iteratively with rewinding (lottery tickets).

* **PERP** ([Zimmer, Andoni, Spiegel & Pokutta 2023, *PERP: Rethinking the Prune-Retrain Paradigm in the Era of
  LLMs*](https://arxiv.org/abs/2312.15230)): after one-shot pruning, freeze every weight matrix and retrain only the
  biases and normalisation parameters (optionally the head), a tiny fraction of the model. The pruned matrices are
  frozen, so their zeros cannot move.
* **Iterative magnitude pruning with rewinding** ([Frankle & Carbin 2019, *The Lottery Ticket
  Hypothesis*](https://arxiv.org/abs/1803.03635); [Frankle et al. 2020, *Linear Mode Connectivity and the Lottery
  Ticket Hypothesis*](https://arxiv.org/abs/1912.05580) for rewinding to step k > 0), the strong baseline:

  1. train densely for `steps`, saving θ_k after `rewind_step` = k steps;
  2. prune `rate` of the *remaining* weights by one global magnitude ranking (open_lth's default 20 %);
  3. rewind the survivors to θ_k (`θ <- m ⊙ θ_k`), retrain for `steps - k` steps with the mask attached;
  4. repeat from 2 for `rounds` rounds: density ≈ (1 - rate)^rounds, masks nested.

  Every phase is a fresh `lablib.train.train` call, so the optimizer state is fresh at each rewind (the spec's
  choice) and, with the default cosine schedule, the phase after step k runs its own cosine over `steps - k` steps
  rather than continuing the first phase's curve.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from lablib.ledger import ParamLedger
from lablib.sparse.masks import (
    Mask,
    MaskStats,
    SparseTrainResult,
    _fresh,
    _module_path,
    _resolve_names,
    _slots,
    _storage,
    _value,
    check_int,
    global_top_k,
    kept_count,
    masked_ledger,
    norm_and_bias_names,
    prunable_names,
)

__all__ = ["LotteryResult", "LotteryRound", "lottery_ticket", "perp_retrain"]


def _head_names(model: nn.Module) -> list[str]:
    return [name for name, holders in _slots(model).items()
            if any(_module_path(model, mod).split(".")[-1] == "lm_head" for mod, _ in holders)]


def perp_retrain(model: nn.Module, *, mask: Mask, batches: Any, loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                 steps: int, train_head: bool = False, head_names: Sequence[str] | None = None,
                 **train_kwargs: Any) -> SparseTrainResult:
    """PERP: apply `mask` to a copy of `model`, then retrain only its biases and norm parameters
    (`norm_and_bias_names`), plus the head when `train_head` (`head_names`, default the parameters of a module
    named `lm_head`; a tied head also moves the embedding it is tied to).

    No trained tensor may be in the mask (that would let pruned entries move: ValueError). `train_kwargs` go to
    `lablib.train.train`. Returns the retrained copy; `model` is not modified.
    """
    from lablib.train import train

    if not isinstance(mask, Mask):
        raise TypeError(f"mask must be a Mask, got {type(mask).__name__}")
    work = mask.apply(model)
    slots = _slots(work)
    selected = norm_and_bias_names(work)
    if train_head:
        heads = list(head_names) if head_names is not None else _head_names(work)
        if not heads:
            raise ValueError("train_head=True but the model has no module named lm_head; pass head_names=")
        unknown = [n for n in heads if n not in slots]
        if unknown:
            raise KeyError(f"head_names names unknown parameters {unknown}")
        selected += [n for n in heads if n not in selected]
    if not selected:
        raise ValueError("the model has no biases or norm parameters to retrain (and train_head is off)")
    clash = [n for n in selected if n in mask]
    if clash:
        raise ValueError(f"{clash} are both pruned by the mask and retrained; retraining them would revive pruned "
                         "entries (drop them from the mask or from head_names)")
    flags = {id(p): p.requires_grad for p in work.parameters()}
    params = [_storage(work, n, slots) for n in selected]
    for param in work.parameters():
        param.requires_grad_(False)
    for param in params:
        param.requires_grad_(True)
    try:
        history = train(work, batches=_fresh(batches), loss_fn=loss_fn, steps=steps, params=params, **train_kwargs)
    finally:
        for param in work.parameters():
            param.requires_grad_(flags.get(id(param), True))
    trained = sum(p.numel() for p in params)
    row = masked_ledger(work, mask)
    row = dataclasses.replace(row, trainable=trained, notes=f"{row.notes}; PERP retrained {trained:,} entries "
                                                            f"({len(selected)} tensors)")
    return SparseTrainResult(model=work, history=history, mask=mask, stats=mask.stats(), trainable=trained,
                             ledger=row)


@dataclass
class LotteryRound:
    """One level of iterative magnitude pruning: `round` (0 = dense), the mask's `density` and `kept` count over the
    pruned tensors, `stats`, the retraining `history`, and `final`: the last eval's metrics (empty without
    `eval_fn`)."""

    round: int
    density: float
    kept: int
    stats: MaskStats
    history: Any
    final: dict[str, float] = field(default_factory=dict)


@dataclass
class LotteryResult:
    """`model`: the last round's retrained sparse model (mask baked in); `mask`: its mask; `rounds`: one
    `LotteryRound` per level, dense first; `masks`: the nested masks, all-ones first; `rewind_state`: θ_k (a
    state dict); `rewind_history`: the first k dense steps (None when k = 0); `ledger`: `masked_ledger(model, mask)`.
    """

    model: nn.Module
    mask: Mask
    rounds: list[LotteryRound]
    masks: list[Mask]
    rewind_state: dict[str, torch.Tensor]
    rewind_history: Any
    ledger: ParamLedger


def _final_metrics(history: Any) -> dict[str, float]:
    if not history.evals:
        return {}
    return {k: v for k, v in history.evals[-1].items() if k != "step"}


def lottery_ticket(model: nn.Module, *, batches: Any, loss_fn: Callable[[nn.Module, Any], torch.Tensor], steps: int,
                   rounds: int, rate: float = 0.2, rewind_step: int = 0, names: Iterable[str] | None = None,
                   **train_kwargs: Any) -> LotteryResult:
    """Iterative magnitude pruning with rewinding (module docstring) over the tensors `names` (default
    `prunable_names(model)`), `rounds` pruning rounds of `rate` each, rewinding to step `rewind_step` (0 = the
    original lottery ticket: rewind to the initialisation).

    `batches` is an iterable or a zero-argument factory; each training phase takes a fresh `iter` of it (a list
    replays the same data every phase, a generator continues where the last phase stopped, a factory starts anew).
    `train_kwargs` go to `lablib.train.train` (`lr`, `seed`, `eval_fn`, `progress`...). Each round prunes
    ⌊rate · remaining⌋ entries (keeps ⌈(1 - rate) · remaining⌉). `model` is not modified.
    """
    from lablib.train import train

    steps = check_int(steps, name="steps")
    rounds = check_int(rounds, name="rounds")
    rewind_step = check_int(rewind_step, name="rewind_step", low=0)
    if rewind_step >= steps:
        raise ValueError(f"rewind_step must be < steps ({steps}), got {rewind_step}")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate < 1:
        raise ValueError(f"rate (the fraction of remaining weights pruned per round) must be in (0, 1), got {rate!r}")
    chosen = _resolve_names(model, names, default=prunable_names)

    work = copy.deepcopy(model)
    rewind_history = None
    if rewind_step:
        rewind_history = train(work, batches=_fresh(batches), loss_fn=loss_fn, steps=rewind_step, **train_kwargs)
    # θ_k: the state every round rewinds to
    rewind_state = {k: v.detach().clone() for k, v in work.state_dict().items()}
    history = train(work, batches=_fresh(batches), loss_fn=loss_fn, steps=steps - rewind_step, **train_kwargs)
    mask = Mask.ones(work, names=chosen)
    masks = [mask]
    results = [LotteryRound(round=0, density=1.0, kept=mask.total_kept(), stats=mask.stats(), history=history,
                            final=_final_metrics(history))]
    for level in range(1, rounds + 1):
        slots = _slots(work)
        # scores: |θ_T| on surviving entries, -inf on pruned ones (so masks are nested)
        scores = {n: _value(work, n, slots).detach().abs().masked_fill(~mask[n].to(_value(work, n, slots).device),
                                                                        float("-inf")) for n in chosen}
        mask = global_top_k(scores, k=kept_count(density=1.0 - rate, numel=mask.total_kept()))
        masks.append(mask)
        # rewind: θ <- m ⊙ θ_k, then retrain the survivors with the mask attached
        work = copy.deepcopy(model)
        work.load_state_dict(rewind_state)
        mask.attach_(work)
        try:
            history = train(work, batches=_fresh(batches), loss_fn=loss_fn, steps=steps - rewind_step,
                            **train_kwargs)
        finally:
            mask.remove_(work, bake=True)
        results.append(LotteryRound(round=level, density=mask.density, kept=mask.total_kept(), stats=mask.stats(),
                                    history=history, final=_final_metrics(history)))
    return LotteryResult(model=work, mask=mask, rounds=results, masks=masks, rewind_state=rewind_state,
                         rewind_history=rewind_history, ledger=masked_ledger(work, mask))
