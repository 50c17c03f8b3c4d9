"""Fisher-weighted averaging (Matena & Raffel, *Merging Models with Fisher-Weighted Averaging*, NeurIPS 2022,
[arXiv:2111.09832](https://arxiv.org/abs/2111.09832)) and the diagonal Fisher it needs.

Averaging treats every parameter of every model as equally sure of itself. Fisher merging weights each parameter by
how much its model's predictions depend on it, the diagonal of the Fisher information

    F_i = E_x E_{y ~ p_θ(y|x)} [ (∂ log p_θ(y|x) / ∂θ_i)² ]

(a Laplace approximation of each model's posterior), and takes the maximum of the product of those posteriors:

    θ*_i = Σ_m w_m F_m,i θ_m,i / Σ_m w_m F_m,i

`diagonal_fisher` estimates F with per-example gradients (`torch.func.vmap` over `grad`), three ways:

* `labels="exact"`: the expectation over y in closed form, Σ_y p(y|x) (∂ log p(y|x))², as the official code does (one
  gradient per class; for classifiers with a few classes).
* `labels="sampled"`: one y ~ p(·|x) per example, an unbiased Monte-Carlo estimate of the same quantity.
* `labels="empirical"`: the dataset's own labels, the "empirical Fisher" (what FISH masks use); not the Fisher, and
  different from it away from a well-fit model.

Implementations disagree on the details: MergeLM and FusionBench add 1e-6 to every Fisher and square the gradient of
a batch-summed Σ_c √p_c log p_c, which mixes classes and examples inside the square; the official code floors the
first model's Fisher at 1e-6. Here the Fisher is the per-example one above, and an entry whose Fishers are all zero
falls back to the weighted average.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lablib.merging.core import (
    StateDict,
    StateDictMismatchError,
    check_choice,
    compute_dtype,
    merge_method,
    per_model,
    plan_merge,
)

__all__ = ["FISHER_LABELS", "diagonal_fisher", "fisher"]

FISHER_LABELS = ("exact", "sampled", "empirical")


def _logits(output: Any) -> torch.Tensor:
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the model must return logits or an object with .logits, got {type(output).__name__}")
    return logits


def _default_nll(output: Any, target: torch.Tensor) -> torch.Tensor:
    # −log p(y|x) of one example: cross-entropy of its (1, C) logits against its (1,) label
    return F.cross_entropy(_logits(output).float(), target)


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], torch.Tensor):
        return batch[0], batch[1]
    raise TypeError(f"each batch must be an inputs tensor or a pair (inputs, targets), got {type(batch).__name__}")


def diagonal_fisher(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor] | None = None,
    labels: str = "exact",
    max_examples: int | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The diagonal Fisher of `model`'s trainable parameters, averaged over the examples in `batches`.

    * `batches`: an iterable of `(inputs, targets)` pairs or of inputs alone (targets are needed only for
      `labels="empirical"`); the first dimension indexes examples.
    * `labels`: "exact" | "sampled" | "empirical" (module docstring). "exact" and "sampled" need `model(x)` to
      return class logits of shape (B, C) (or an object with `.logits`).
    * `loss_fn(output, target) -> scalar`: the negative log-likelihood of one example, given the model's output for a
      batch of one and that example's target with a batch dimension of one; default cross-entropy on the logits.
      Used by "sampled" (with the sampled label) and "empirical" (with the given target), so an LM can pass a loss
      that sums its per-token NLLs. "exact" always uses log-softmax of the logits.
    * `max_examples`: stop after this many examples. `seed` seeds the label sampling.

    Returns `{name: F}` for every parameter with `requires_grad`, named as in `model.named_parameters()`, in at least
    float32. The model runs in eval mode (no dropout); its modes are restored afterwards. Parameters are not changed.
    """
    from torch.func import functional_call, grad, jacrev, vmap

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_choice("labels", labels, FISHER_LABELS)
    if labels == "exact" and loss_fn is not None:
        raise ValueError("labels='exact' takes the expectation over classes from the logits; loss_fn is not used "
                         "(pass labels='sampled' or 'empirical' to use it)")
    if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, int)
                                     or max_examples < 1):
        raise ValueError(f"max_examples must be a positive int or None, got {max_examples!r}")
    nll = loss_fn if loss_fn is not None else _default_nll
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("model has no parameters with requires_grad=True to compute a Fisher for")
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    device = next(iter(params.values())).device
    generator = torch.Generator(device=device).manual_seed(seed)
    sums = {name: torch.zeros_like(p, dtype=compute_dtype(p.dtype)) for name, p in params.items()}
    count = 0

    def forward_one(p: dict[str, torch.Tensor], x: torch.Tensor) -> Any:
        return functional_call(model, (p, buffers), (x.unsqueeze(0),))

    def log_probs_one(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        logits = _logits(forward_one(p, x))
        if logits.dim() != 2:
            raise ValueError(f"labels='{labels}' needs (batch, classes) logits, got shape {tuple(logits.shape)}")
        # log p(·|x): (C,)
        return torch.log_softmax(logits.float(), dim=-1).squeeze(0)

    def nll_one(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nll(forward_one(p, x), y.unsqueeze(0))

    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        for batch in batches:
            if max_examples is not None and count >= max_examples:
                break
            x, y = _split_batch(batch)
            take = x.shape[0] if max_examples is None else min(x.shape[0], max_examples - count)
            x = x[:take].to(device)
            if labels == "exact":
                # J[c] = ∂ log p(c|x) / ∂θ per example: (B, C, *shape)
                jac = vmap(jacrev(log_probs_one), in_dims=(None, 0))(params, x)
                probs = vmap(log_probs_one, in_dims=(None, 0))(params, x).exp().detach()
                for name, j in jac.items():
                    # F += Σ_b Σ_c p(c|x_b) J[b, c]²
                    weights = probs.reshape(*probs.shape, *([1] * (j.dim() - 2))).to(sums[name].dtype)
                    sums[name] += (weights * j.to(sums[name].dtype) ** 2).sum(dim=(0, 1))
            else:
                if labels == "sampled":
                    with torch.no_grad():
                        probs = torch.softmax(_logits(model(x)).float(), dim=-1)
                    if probs.dim() != 2:
                        raise ValueError(f"labels='sampled' needs (batch, classes) logits, got {tuple(probs.shape)}")
                    # y ~ p(·|x), one label per example
                    y = torch.multinomial(probs, 1, generator=generator).squeeze(1)
                elif y is None:
                    raise ValueError("labels='empirical' needs batches of (inputs, targets)")
                y = y[:take].to(device)
                grads = vmap(grad(nll_one), in_dims=(None, 0, 0))(params, x, y)
                for name, g in grads.items():
                    # F += Σ_b (∂ −log p(y_b|x_b) / ∂θ)²
                    sums[name] += (g.to(sums[name].dtype) ** 2).sum(dim=0)
            count += take
    finally:
        for module, mode in modes.items():
            module.train(mode)
    if count == 0:
        raise ValueError("batches held no examples")
    # F = (1/N) Σ_n ...
    return {name: total / count for name, total in sums.items()}


@merge_method("fisher", needs_base=False, per_model=("weight",), reference="https://arxiv.org/abs/2111.09832")
def fisher(
    base: StateDict | None,
    models: Sequence[StateDict],
    /,
    *,
    fishers: Sequence[Mapping[str, torch.Tensor]],
    weight: float | Sequence[float] | None = None,
    normalize_fisher: bool = False,
    exclude: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """Fisher-weighted averaging: θ*_i = Σ_m w_m F_m,i θ_m,i / Σ_m w_m F_m,i (Matena & Raffel 2022).

    * `fishers`: one `{key: F}` per model (from `diagonal_fisher`), each F shaped like that key's tensor. A key no
      Fisher covers (buffers, tied duplicates, frozen parameters) gets the weighted average, and so does every entry
      where Σ_m w_m F_m,i = 0. Keys must appear in all of the Fishers or in none.
    * `weight`: the paper's per-model λ_m (default uniform; the official code searches them on validation data).
    * `normalize_fisher=True` divides each model's Fisher by its global L2 norm first, as the official code's option
      does, so models whose Fisher is larger overall do not dominate.

    Equal Fishers give plain weighted averaging; a model whose Fisher is 0 everywhere is ignored. `base` is not used
    in the arithmetic (it may be None). Not a mergekit method (mergekit has no data-dependent merges).
    """
    if not isinstance(normalize_fisher, bool):
        raise TypeError(f"normalize_fisher must be a bool, got {normalize_fisher!r}")
    plan = plan_merge(base, models, needs_base=False, exclude=exclude, method="fisher")
    if isinstance(fishers, Mapping) or not isinstance(fishers, Sequence) or len(fishers) != len(models):
        is_sequence = isinstance(fishers, Sequence) and not isinstance(fishers, Mapping)
        got = len(fishers) if is_sequence else type(fishers).__name__
        raise ValueError(f"fishers must be a sequence with one Fisher state dict per model ({len(models)}), got {got}")
    weights = per_model("weight", weight, len(models), default=1.0)
    for m, fisher_m in enumerate(fishers):
        if not isinstance(fisher_m, Mapping):
            raise TypeError(f"fishers[{m}] must be a Mapping[str, Tensor], got {type(fisher_m).__name__}")
        for key, value in fisher_m.items():
            if key not in plan.reference:
                raise StateDictMismatchError(f"fishers[{m}] has key {key!r}, which the models lack")
            if not isinstance(value, torch.Tensor) or value.shape != plan.reference[key].shape:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise StateDictMismatchError(
                    f"key {key!r}: fishers[{m}] has shape {got} but the parameter has "
                    f"{tuple(plan.reference[key].shape)}"
                )
            if bool((value < 0).any()):
                raise ValueError(f"key {key!r}: fishers[{m}] has negative entries; a diagonal Fisher is >= 0")
    scales = [1.0] * len(models)
    if normalize_fisher:
        for m, fisher_m in enumerate(fishers):
            # F̃_m = F_m / ‖F_m‖₂ over all keys
            norm = float(torch.sqrt(sum((v.double() ** 2).sum() for v in fisher_m.values())))
            scales[m] = 1.0 / norm if norm > 0 else 1.0
    merged = {}
    total_weight = sum(weights)
    for key in plan.merge_keys:
        dtype = compute_dtype(plan.reference[key].dtype)
        values = torch.stack([model[key].to(dtype) for model in models])
        w = torch.tensor(weights, dtype=dtype, device=values.device).view(-1, *([1] * (values.dim() - 1)))
        # weighted average Σ_m w_m θ_m / Σ_m w_m: the fallback
        average = (w * values).sum(dim=0) / (total_weight if abs(total_weight) >= 1e-8 else 1.0)
        present = [key in f for f in fishers]
        if not any(present):
            merged[key] = average
            continue
        if not all(present):
            missing = present.index(False)
            raise StateDictMismatchError(f"key {key!r}: fishers[{missing}] lacks it but another Fisher has it")
        f = torch.stack([fishers[m][key].to(device=values.device, dtype=dtype) * scales[m] for m in range(len(models))])
        # numerator Σ_m w_m F_m θ_m and denominator Σ_m w_m F_m
        numerator = (w * f * values).sum(dim=0)
        denominator = (w * f).sum(dim=0)
        safe = torch.where(denominator != 0, denominator, torch.ones_like(denominator))
        # θ* = Σ_m w_m F_m θ_m / Σ_m w_m F_m, or the weighted average where every F is 0
        merged[key] = torch.where(denominator != 0, numerator / safe, average)
    return plan.finish(merged)
