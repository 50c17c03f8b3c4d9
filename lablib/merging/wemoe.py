"""WEMoE: weight-ensembling mixture of experts over task vectors.

Tang et al., *Merging Multi-Task Models via Weight-Ensembling Mixture of Experts*, ICML 2024
([arXiv:2402.00433](https://arxiv.org/abs/2402.00433)). Static merges give every input the same weights; WEMoE
merges everything but the MLPs by task arithmetic and turns each MLP into a module whose weights depend on the input:

    p(x) = router(x) ∈ Δ^T                                   (a lablib.moe router, softmax over the T tasks)
    θ(x) = θ_0 + λ T Σ_t p_t(x) τ_t,   τ_t = θ_t − θ_0        (one weight set per sample)
    y    = MLP(x; θ(x))

With the routing uniform (p_t = 1/T, the router's gate is zero-initialised) θ(x) is task arithmetic with
coefficient λ, so an untrained WEMoE equals `task_arithmetic(lambda_=λ)`; the router is then trained briefly on
*unlabeled* inputs by minimising the entropy of the model's predictions (the paper's test-time adaptation), with
every other weight frozen. Per sample means: the router scores every token, and a sample's coefficients are the mean
over its tokens (the paper routes per sample too).

Differences from the paper, stated: the router is `lablib.moe`'s (`build_router`, default `"top_k"` with
top_k = T), so the coefficients lie on a simplex scaled by λT rather than being the unconstrained output of the
paper's two-layer router MLP; and the paper applies WEMoE to CLIP-ViT MLPs, here any module (the FFNs of
`TinyTransformer` by default, or hidden layers of an `MLPClassifier`).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap

from lablib.ledger import LedgerCounts
from lablib.merging.core import check_number
from lablib.merging.methods import task_arithmetic
from lablib.moe.routers import build_router

__all__ = ["WeightEnsemblingMoE", "wemoe", "wemoe_modules", "train_wemoe_router", "WEMoETraining"]


def _first_in_features(module: nn.Module) -> int:
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            return sub.in_features
    raise ValueError(f"cannot infer d_model for {type(module).__name__}: it has no nn.Linear; pass d_model")


class WeightEnsemblingMoE(nn.Module):
    """`module` with input-dependent weights θ_0 + λT Σ_t p_t(x) τ_t (see the module docstring).

    * `module`: the base module (copied; its parameters become the frozen buffer θ_0).
    * `task_vectors`: T mappings, each {parameter name of `module` -> τ_t} with exactly `module`'s names and shapes.
    * `lambda_`: the task-arithmetic coefficient the uniform routing reproduces.
    * `router`, `router_options`: a `lablib.moe.routers.build_router` name and its options (top_k is T).
    * `d_model`: the router's input width (default: the first nn.Linear's in_features).

    After a forward, `last_routing` holds the per-sample probabilities (B, T).
    """

    def __init__(
        self,
        *,
        module: nn.Module,
        task_vectors: Sequence[Mapping[str, torch.Tensor]],
        lambda_: float = 0.3,
        router: str = "top_k",
        d_model: int | None = None,
        router_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
        if isinstance(task_vectors, Mapping) or len(task_vectors) == 0:
            raise ValueError("task_vectors must be a non-empty sequence of {name: tensor} mappings, one per task")
        self.lambda_ = check_number("lambda_", lambda_)
        self.module = copy.deepcopy(module)
        self.module.requires_grad_(False)
        self.param_names = [name for name, _ in self.module.named_parameters()]
        params = dict(self.module.named_parameters())
        self.num_tasks = len(task_vectors)
        for t, tau in enumerate(task_vectors):
            missing = sorted(set(self.param_names) - set(tau))
            extra = sorted(set(tau) - set(self.param_names))
            if missing or extra:
                raise ValueError(f"task_vectors[{t}]: missing keys {missing}, unexpected keys {extra}")
            for name in self.param_names:
                if tuple(tau[name].shape) != tuple(params[name].shape):
                    raise ValueError(f"task_vectors[{t}][{name!r}] has shape {tuple(tau[name].shape)}, the module's "
                                     f"parameter {tuple(params[name].shape)}")
        # τ stacked per parameter: (T, *shape), frozen buffers (copies: the caller's tensors are never touched)
        for j, name in enumerate(self.param_names):
            stacked = torch.stack([tau[name].detach().to(params[name].dtype) for tau in task_vectors]).clone()
            self.register_buffer(f"task_vector_{j}", stacked)
        d_model = _first_in_features(self.module) if d_model is None else d_model
        self.router = build_router(
            router, d_model=d_model, num_experts=self.num_tasks, top_k=self.num_tasks, **dict(router_options or {})
        )
        gate = getattr(self.router, "gate", None)
        if isinstance(gate, nn.Linear):
            # p_t = 1/T at the start: WEMoE starts as task arithmetic with coefficient λ
            nn.init.zeros_(gate.weight)
        self.last_routing: torch.Tensor | None = None

    def stacked_task_vectors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, f"task_vector_{j}") for j, name in enumerate(self.param_names)}

    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample coefficients λT p(x): (B, T), from x of shape (B, d) or (B, S, d)."""
        if x.dim() not in (2, 3):
            raise ValueError(f"WEMoE expects x of shape (batch, d) or (batch, seq, d), got {tuple(x.shape)}")
        tokens = x.reshape(-1, x.shape[-1])
        # p(x_token) : (B·S, T)
        probs = self.router(tokens).probs
        # p(sample) = mean over its tokens : (B, T)
        per_sample = probs.view(x.shape[0], -1, self.num_tasks).mean(dim=1)
        self.last_routing = per_sample.detach()
        return self.lambda_ * self.num_tasks * per_sample

    def merged_weights(self, coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        """θ(x) = θ_0 + Σ_t c_t τ_t for each sample: {name: (B, *shape)}."""
        base = dict(self.module.named_parameters())
        out = {}
        for name, tau in self.stacked_task_vectors().items():
            # Σ_t c_bt τ_t : (B, *shape)
            mixed = torch.einsum("bt,t...->b...", coefficients.to(tau.dtype), tau)
            out[name] = base[name].unsqueeze(0) + mixed
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        coefficients = self.coefficients(x)
        weights = self.merged_weights(coefficients)

        def one(sample_weights: dict[str, torch.Tensor], sample: torch.Tensor) -> torch.Tensor:
            return functional_call(self.module, sample_weights, (sample.unsqueeze(0),)).squeeze(0)

        # y_b = MLP(x_b; θ(x_b)) : same leading shape as x
        return vmap(one, randomness="different")(weights, x)

    def ledger_counts(self) -> LedgerCounts:
        """Stored: router + θ_0 + T task vectors. Active per token: router + one merged weight set."""
        router = sum(p.numel() for p in self.router.parameters())
        base = sum(p.numel() for p in self.module.parameters())
        matmul = sum(m.weight.numel() for m in self.module.modules() if isinstance(m, nn.Linear))
        total = router + base * (self.num_tasks + 1)
        return LedgerCounts(
            total=total, active_per_token=router + base, stored=total,
            flops_per_token=self.router.flops_per_token() + 2 * matmul, trainable=router,
        )

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, lambda_={self.lambda_}"


def wemoe_modules(model: nn.Module) -> list[str]:
    """The default modules WEMoE turns into MoEs: every submodule named `...ffn` (TinyTransformer's FFNs)."""
    return [name for name, _ in model.named_modules() if re.search(r"(^|\.)ffn$", name)]


def wemoe(
    base: nn.Module,
    experts: Sequence[nn.Module],
    *,
    lambda_: float = 0.3,
    moe_modules: Sequence[str] | None = None,
    router: str = "top_k",
    router_options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Build a WEMoE model: a copy of `base` with every weight task-arithmetic merged (coefficient λ) except the
    `moe_modules` (default `wemoe_modules(base)`), which become `WeightEnsemblingMoE`s over the experts' task
    vectors. `base` and `experts` are not modified. Train the routers with `train_wemoe_router`."""
    if len(experts) == 0:
        raise ValueError("wemoe needs at least one expert model")
    base_state = base.state_dict()
    expert_states = [e.state_dict() for e in experts]
    names = list(moe_modules) if moe_modules is not None else wemoe_modules(base)
    if not names:
        raise ValueError(f"{type(base).__name__} has no submodule named '...ffn'; pass moe_modules=[names]")
    model = copy.deepcopy(base)
    model.load_state_dict(task_arithmetic(base_state, expert_states, lambda_=lambda_))
    for name in names:
        try:
            sub = base.get_submodule(name)
        except AttributeError:
            raise ValueError(f"moe_modules: {type(base).__name__} has no submodule {name!r}") from None
        param_names = [n for n, _ in sub.named_parameters()]
        taus = [{n: state[f"{name}.{n}"] - base_state[f"{name}.{n}"] for n in param_names} for state in expert_states]
        moe = WeightEnsemblingMoE(
            module=sub, task_vectors=taus, lambda_=lambda_, router=router, router_options=router_options
        )
        model.set_submodule(name, moe)
    return model


@dataclass
class WEMoETraining:
    """`train_wemoe_router`'s record: the entropy per step and, per WEMoE module, the mean routing (T,) at the end."""

    losses: list[float]
    mean_routing: dict[str, list[float]] = field(default_factory=dict)


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def train_wemoe_router(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    steps: int = 50,
    lr: float = 1e-2,
    seed: int = 0,
) -> WEMoETraining:
    """Train only the WEMoE routers of `model` (in place, as the name says) on unlabeled input batches by minimising
    the mean prediction entropy H(softmax(f(x))) (test-time adaptation). `batches` is cycled for `steps` steps."""
    moes = {name: m for name, m in model.named_modules() if isinstance(m, WeightEnsemblingMoE)}
    if not moes:
        raise ValueError("model has no WeightEnsemblingMoE module; build it with wemoe()")
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty: the router needs unlabeled inputs")
    torch.manual_seed(seed)
    router_params = [p for m in moes.values() for p in m.router.parameters()]
    flags = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    for p in router_params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(router_params, lr=lr)
    losses = []
    was_training = model.training
    model.eval()  # no dropout; routers have no train-only behaviour we want here
    try:
        for step in range(steps):
            x = batches[step % len(batches)]
            logp = _logits(model(x)).float().log_softmax(dim=-1)
            # H = −Σ p log p, averaged over predictions
            entropy = -(logp.exp() * logp).sum(dim=-1).mean()
            optimizer.zero_grad()
            entropy.backward()
            optimizer.step()
            losses.append(float(entropy.detach()))
        with torch.no_grad():
            model(batches[0])
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    mean_routing = {
        name: [round(float(v), 6) for v in m.last_routing.mean(dim=0)] for name, m in moes.items()
        if m.last_routing is not None
    }
    return WEMoETraining(losses=losses, mean_routing=mean_routing)
