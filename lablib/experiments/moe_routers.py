"""Lab 01's seeded experiments: MoE routers on a tiny byte-level LM (Shakespeare + Python code).

Everything is callable at tiny sizes (the tests do) and cached by its configuration, so the lab reruns instantly.

* `train_router_lm`: a 2-layer tiny LM whose FFNs are MoE layers (or a dense baseline), trained with a balancing
  method ("none", the Switch/GShard "aux_loss", or auxiliary-loss-free "bias" with step `bias_update_rate`); it
  records the expert load (max / mean, per layer) over training.
* `routing_table`: the share of tokens each expert receives on Shakespeare vs Python validation text, per layer,
  with a specialization score (the Jensen-Shannon divergence between the two corpora's expert distributions)
  against a shuffled-label control.
* `router_choices` / `dropped_fraction`: tokens dropped at a capacity factor, computed from a trained model's
  router outputs without retraining (what the lab's capacity slider needs).
* `balance_sweep`: expert load over training under each balancing method.
* `equifinality_sweep` / `equifinality_verdict`: Ternovtsii & Bilak, *Equifinality in Mixture of Experts: Routing
  Topology Does Not Determine Language Modeling Quality*, at toy scale. Linear (softmax top-k), cosine, hash and
  random-fixed routers share one expert budget, 3 seeds each, against dense baselines; the verdict on "routing
  topology changes loss by less than the seed spread" is computed from the numbers.

**The matched budget.** Every MoE variant has 1024 expert hidden units per layer and uses 256 of them per token,
the width of the dense FFN (4 d_model): the scored routers pick the top 2 of 8 experts of width 128, hash routing
(top-1 by construction) picks 1 of 4 experts of width 256. Both spend the same parameters and FLOPs per token; a
width-256 expert is exactly a fixed pair of width-128 experts with weight 1. Routers differ only in their own few
hundred parameters (reported in each variant's ledger).
"""

from __future__ import annotations

import json
import math
import statistics
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from lablib import cache as cache_mod
from lablib import data, ledger, models, moe, train
from lablib.experiments.foundations import Verdict
from lablib.experiments.seeded import SeededLosses

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RECORD_FILE = "moe_routers.json"
CORPORA = ("shakespeare", "python")

# The Equifinality comparison set, at one expert budget (see the module docstring).
ROUTER_VARIANTS: dict[str, dict[str, Any]] = {
    "linear": dict(router="top_k", num_experts=8, top_k=2, d_hidden=128),
    # d_space 8: 8·64 + 8·8 + 1 = 577 router parameters per layer, about the linear router's 8·64 = 512
    "cosine": dict(router="cosine", num_experts=8, top_k=2, d_hidden=128, router_kwargs={"d_space": 8}),
    "hash": dict(router="hash", num_experts=4, top_k=1, d_hidden=256),
    "random_fixed": dict(router="random_fixed", num_experts=8, top_k=2, d_hidden=128),
}
# Dense baselines: the same active FFN width as every MoE variant, and a 4x narrower one (the sanity check).
DENSE_BASELINES: dict[str, int] = {"dense_256": 256, "dense_64": 64}
VARIANT_LABELS = {
    "linear": "linear softmax top-2",
    "cosine": "cosine top-2 (d_space 8)",
    "hash": "hash on token id (top-1)",
    "random_fixed": "random-fixed top-2",
    "dense_256": "dense FFN 256 (= MoE active)",
    "dense_64": "dense FFN 64 (1/4 width)",
}
BALANCE_METHODS = ("none", "aux_loss", "bias")
AUX_LOSS_COEF = 0.01  # Switch Transformers' α
SANITY_PAIR = ("dense_64", "dense_256")  # (expected worse, expected better)

MODEL_DEFAULTS = dict(d_model=64, n_layers=2, n_heads=4, seq_len=64)
TRAIN_DEFAULTS = dict(steps=600, batch_size=32, lr=2e-3)


def _check_variant(variant: str) -> None:
    if variant not in ROUTER_VARIANTS and variant not in DENSE_BASELINES:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(ROUTER_VARIANTS) + sorted(DENSE_BASELINES)}")


def _check_balance(balance: str, bias_update_rate: float | None) -> None:
    if balance not in BALANCE_METHODS:
        raise ValueError(f"unknown balance method {balance!r}; choose one of {list(BALANCE_METHODS)}")
    if balance == "bias":
        if isinstance(bias_update_rate, bool) or not isinstance(bias_update_rate, (int, float)) or bias_update_rate <= 0:
            raise ValueError(f"balance='bias' needs bias_update_rate > 0, got {bias_update_rate!r}")
    elif bias_update_rate is not None:
        raise ValueError(f"bias_update_rate only applies to balance='bias', got balance={balance!r}")


# ----------------------------------------------------------------------------------------------------------------
# Models and training
# ----------------------------------------------------------------------------------------------------------------


def build_model(
    variant: str,
    *,
    seed: int,
    balance: str = "aux_loss",
    bias_update_rate: float | None = None,
    d_model: int = MODEL_DEFAULTS["d_model"],
    n_layers: int = MODEL_DEFAULTS["n_layers"],
    n_heads: int = MODEL_DEFAULTS["n_heads"],
    seq_len: int = MODEL_DEFAULTS["seq_len"],
) -> models.TinyTransformer:
    """An untrained tiny LM: every FFN an MoE of `ROUTER_VARIANTS[variant]`, or the dense `DENSE_BASELINES[variant]`.

    `MoETransformer` for the MoE variants (hash routing reads the input token ids). `balance`: "none" (no balance
    loss), "aux_loss" (Switch/GShard loss, α = 0.01) or "bias" (auxiliary-loss-free, step `bias_update_rate`).
    """
    _check_variant(variant)
    _check_balance(balance, bias_update_rate)
    torch.manual_seed(seed)
    if variant in DENSE_BASELINES:
        config = models.TransformerConfig(vocab_size=data.ByteTokenizer.vocab_size, d_model=d_model,
                                          n_layers=n_layers, n_heads=n_heads, seq_len=seq_len,
                                          d_hidden=DENSE_BASELINES[variant])
        return models.TinyTransformer(config)
    config = models.TransformerConfig(vocab_size=data.ByteTokenizer.vocab_size, d_model=d_model, n_layers=n_layers,
                                      n_heads=n_heads, seq_len=seq_len)
    spec = dict(ROUTER_VARIANTS[variant])
    factory = moe.moe_ffn_factory(
        **spec,
        seed=seed,
        router_aux_loss_coef=AUX_LOSS_COEF if balance == "aux_loss" else 0.0,
        bias_update_rate=bias_update_rate if balance == "bias" else None,
    )
    return moe.MoETransformer(config, ffn_factory=factory)


def moe_layers(model: torch.nn.Module) -> list[tuple[int, moe.MoELayer]]:
    """(block index, layer) for every MoE FFN of a `TinyTransformer`."""
    return [(i, block.ffn) for i, block in enumerate(model.blocks) if isinstance(block.ffn, moe.MoELayer)]


def router_params(model: torch.nn.Module) -> int:
    """Learned router parameters over all MoE layers (0 for hash and random-fixed routing, and for dense models)."""
    return sum(p.numel() for _, layer in moe_layers(model) for p in layer.router.parameters())


@dataclass
class RouterLMResult:
    """A trained (or cached) tiny LM with its history, ledger, validation losses and expert-load trace.

    * `val_loss`: mean next-byte loss on the mixed validation split (the history's last eval).
    * `load_steps`, `load_imbalance`: at each `load_steps[j]` (updates done), the mean over the preceding window of
      training steps of max_e c_e / mean_e c_e, one list per MoE layer (c_e: assignments the router made to e).
    """

    variant: str
    model: models.TinyTransformer
    history: train.History
    param_ledger: ledger.ParamLedger
    router_params: int
    val_loss: float
    val_loss_by_corpus: dict[str, float]
    load_steps: list[int]
    load_imbalance: list[list[float]]
    from_cache: bool


def train_router_lm(
    *,
    variant: str = "linear",
    seed: int = 0,
    balance: str = "aux_loss",
    bias_update_rate: float | None = None,
    steps: int = TRAIN_DEFAULTS["steps"],
    batch_size: int = TRAIN_DEFAULTS["batch_size"],
    lr: float = TRAIN_DEFAULTS["lr"],
    d_model: int = MODEL_DEFAULTS["d_model"],
    n_layers: int = MODEL_DEFAULTS["n_layers"],
    n_heads: int = MODEL_DEFAULTS["n_heads"],
    seq_len: int = MODEL_DEFAULTS["seq_len"],
    max_chars: int = 200_000,
    eval_batches: int = 16,
    load_every: int = 20,
    progress: bool = True,
    checkpoint_cache: cache_mod.CheckpointCache | None = None,
) -> RouterLMResult:
    """Train (or load from the cache) one variant on Shakespeare + Python; see `build_model` for the arguments.

    The loss is the LM loss plus the layers' aux loss; with `balance="bias"` every training step also updates the
    selection bias from the step's load (`moe.update_expert_biases`). Evaluations (on the same validation windows
    for every run) happen 3 times and at the end.
    """
    _check_variant(variant)
    _check_balance(balance, bias_update_rate)
    if not isinstance(load_every, int) or load_every < 1:
        raise ValueError(f"load_every must be a positive int, got {load_every!r}")
    dense = variant in DENSE_BASELINES
    model_kwargs = dict(d_model=d_model, n_layers=n_layers, n_heads=n_heads, seq_len=seq_len)
    run = dict(
        experiment="moe_router_lm", variant=variant, seed=seed, model=model_kwargs, corpora=list(CORPORA),
        max_chars=max_chars, steps=steps, batch_size=batch_size, lr=lr, eval_batches=eval_batches,
        load_every=load_every,
    )
    if dense:
        run["d_hidden"] = DENSE_BASELINES[variant]
        balance, bias_update_rate = "none", None  # nothing to balance
    else:
        run.update(spec=ROUTER_VARIANTS[variant], balance=balance, bias_update_rate=bias_update_rate,
                   aux_loss_coef=AUX_LOSS_COEF if balance == "aux_loss" else 0.0)
    splits = data.text_corpus(list(CORPORA), max_chars=max_chars)

    def build() -> models.TinyTransformer:
        return build_model(variant, seed=seed, balance=balance, bias_update_rate=bias_update_rate, **model_kwargs)

    def fit(model) -> dict:
        per_step: list[list[float]] = []

        def loss_fn(m, batch):
            x, y = batch
            out = m(x, y)
            if m.training and torch.is_grad_enabled():
                per_step.append([moe.load_imbalance(o.routed_per_expert) for o in out.layer_outputs
                                 if isinstance(o, moe.MoEOutput)])
                if balance == "bias":
                    # after the forward = after the step for the bias: this step's routing is already decided
                    moe.update_expert_biases(m, out)
            return out.loss + out.aux_loss

        def eval_fn(m) -> dict[str, float]:
            return {"val_loss": train.evaluate_lm(m, splits.val, batch_size=batch_size, seq_len=seq_len,
                                                  max_batches=eval_batches, seed=0)}

        batches = data.lm_batches(splits.train, batch_size=batch_size, seq_len=seq_len, seed=seed)
        history = train.train(model, batches=batches, loss_fn=loss_fn, steps=steps, lr=lr, eval_fn=eval_fn,
                              eval_every=max(steps // 3, 1), seed=seed, progress=progress)
        windows = [per_step[i:i + load_every] for i in range(0, len(per_step), load_every)]
        n_moe = len(per_step[0]) if per_step else 0
        load_steps = [min(i + load_every, len(per_step)) for i in range(0, len(per_step), load_every)]
        load = [[statistics.fmean(step[layer] for step in w) for w in windows] for layer in range(n_moe)]
        by_corpus = {}
        for name in CORPORA:
            own = data.text_corpus(name, max_chars=max_chars)
            by_corpus[name] = train.evaluate_lm(model, own.val, batch_size=batch_size, seq_len=seq_len,
                                                max_batches=max(eval_batches // 2, 1), seed=0)
        return dict(history=history.to_dict(), load_steps=load_steps if n_moe else [], load_imbalance=load,
                    val_loss_by_corpus=by_corpus)

    model, meta, from_cache = cache_mod.cached_train(run, build=build, fit=fit, cache=checkpoint_cache)
    history = train.History.from_dict(meta["history"])
    return RouterLMResult(
        variant=variant,
        model=model,
        history=history,
        param_ledger=ledger.ledger(model, name=VARIANT_LABELS[variant]),
        router_params=router_params(model),
        val_loss=history.final("val_loss"),
        val_loss_by_corpus=dict(meta["val_loss_by_corpus"]),
        load_steps=list(meta["load_steps"]),
        load_imbalance=[list(x) for x in meta["load_imbalance"]],
        from_cache=from_cache,
    )


# ----------------------------------------------------------------------------------------------------------------
# Routing table: does specialization appear?
# ----------------------------------------------------------------------------------------------------------------

BYTE_CLASSES = ("space", "newline", "lowercase", "uppercase", "digit", "punctuation", "other")


def byte_class(token: int) -> str:
    """The class of one byte, for the by-class routing table."""
    char = chr(token) if token < 128 else ""
    if char == " ":
        return "space"
    if char == "\n":
        return "newline"
    if char and char in string.ascii_lowercase:
        return "lowercase"
    if char and char in string.ascii_uppercase:
        return "uppercase"
    if char and char in string.digits:
        return "digit"
    if char and char in string.punctuation:
        return "punctuation"
    return "other"


_CLASS_OF_BYTE = torch.tensor([BYTE_CLASSES.index(byte_class(b)) for b in range(256)])


def js_divergence(p: Sequence[float] | torch.Tensor, q: Sequence[float] | torch.Tensor) -> float:
    """Jensen-Shannon divergence in bits between two distributions (0 = identical, 1 = disjoint supports)."""
    p, q = torch.as_tensor(p, dtype=torch.float64), torch.as_tensor(q, dtype=torch.float64)
    if p.shape != q.shape or p.dim() != 1:
        raise ValueError(f"p and q must be 1-D of the same length, got {tuple(p.shape)} and {tuple(q.shape)}")
    if (p < 0).any() or (q < 0).any() or p.sum() <= 0 or q.sum() <= 0:
        raise ValueError("p and q must be non-negative with a positive sum")
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: torch.Tensor) -> torch.Tensor:
        # KL(a || m) in bits, 0 log 0 = 0
        return torch.where(a > 0, a * (a / m).log2(), torch.zeros_like(a)).sum()

    return float((kl(p) + kl(q)) / 2)


@dataclass
class RoutingTable:
    """Where the tokens of each corpus go, per MoE layer (keys are strings so the table round-trips through JSON).

    * `shares[layer][corpus]`: fraction of that corpus's routing assignments that go to each expert (sums to 1;
      with top-k every token makes k assignments).
    * `class_shares[layer][f"{corpus}: {class}"]`: the same for the tokens of one byte class.
    * `js[layer]`: Jensen-Shannon divergence (bits) between the corpora's expert distributions.
    * `js_control[layer]`: the same score with the corpus labels shuffled across the sampled windows,
      `{"mean": ..., "max": ...}` over `n_shuffles` shuffles: what the score looks like without specialization.
    """

    layers: list[int]
    num_experts: int
    corpora: list[str]
    tokens_per_corpus: int
    shares: dict[str, dict[str, list[float]]]
    class_shares: dict[str, dict[str, list[float]]]
    js: dict[str, float]
    js_control: dict[str, dict[str, float]]
    config: dict = field(default_factory=dict)

    def specialized_layers(self) -> list[int]:
        """Layers whose score exceeds every shuffled-label control score."""
        return [layer for layer in self.layers if self.js[str(layer)] > self.js_control[str(layer)]["max"]]

    def to_dict(self) -> dict:
        return asdict(self)


def _route_windows(model: torch.nn.Module, x: torch.Tensor, *, batch_size: int) -> list[torch.Tensor]:
    """For windows x (W, T): per MoE layer, the (W, T, k) expert indices with -1 for slots not computed."""
    per_layer: list[list[torch.Tensor]] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, x.shape[0], batch_size):
                out = model(x[start:start + batch_size])
                moe_outputs = [o for o in out.layer_outputs if isinstance(o, moe.MoEOutput)]
                if not moe_outputs:
                    raise ValueError("the model has no MoE layers to read routing from")
                if not per_layer:
                    per_layer = [[] for _ in moe_outputs]
                for store, o in zip(per_layer, moe_outputs):
                    store.append(torch.where(o.kept, o.indices, torch.full_like(o.indices, -1)))
    finally:
        model.train(was_training)
    return [torch.cat(chunks) for chunks in per_layer]


def _counts(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(W, T, k) indices (-1 = none) -> (W, E) assignments per window and expert."""
    valid = indices >= 0
    one_hot = torch.nn.functional.one_hot(indices.clamp_min(0), num_experts) * valid.unsqueeze(-1)
    return one_hot.sum(dim=(1, 2)).double()


def routing_table(
    model: torch.nn.Module,
    *,
    n_windows: int = 64,
    seq_len: int | None = None,
    max_chars: int = 200_000,
    n_shuffles: int = 200,
    batch_size: int = 32,
    seed: int = 0,
) -> RoutingTable:
    """Route `n_windows` random validation windows of each corpus through `model`; see `RoutingTable`.

    The control shuffles which windows count as Shakespeare and which as Python (whole windows, so the text's
    local correlations are kept) `n_shuffles` times, from a generator seeded `seed`.
    """
    if n_windows < 2 or n_shuffles < 1:
        raise ValueError(f"need n_windows >= 2 and n_shuffles >= 1, got {n_windows} and {n_shuffles}")
    layers = [i for i, _ in moe_layers(model)]
    if not layers:
        raise ValueError("routing_table needs a model with MoE layers")
    num_experts = moe_layers(model)[0][1].num_routed_experts
    seq_len = seq_len or model.config.seq_len
    generator = torch.Generator().manual_seed(seed)
    counts: dict[str, list[torch.Tensor]] = {}
    class_counts: dict[str, list[dict[str, torch.Tensor]]] = {}
    for corpus in CORPORA:
        val = data.text_corpus(corpus, max_chars=max_chars).val
        x, _ = data.sample_lm_batch(val, batch_size=n_windows, seq_len=seq_len, generator=generator)
        routed = _route_windows(model, x, batch_size=batch_size)
        counts[corpus] = [_counts(idx, num_experts) for idx in routed]
        classes = _CLASS_OF_BYTE[x]
        class_counts[corpus] = []
        for idx in routed:
            per_class = {}
            for c, name in enumerate(BYTE_CLASSES):
                chosen = idx[classes == c]  # (n, k)
                if chosen.numel():
                    per_class[name] = _counts(chosen.unsqueeze(0), num_experts)[0]
            class_counts[corpus].append(per_class)
    shares, class_shares, js, control = {}, {}, {}, {}
    for j, layer in enumerate(layers):
        key = str(layer)
        totals = {c: counts[c][j].sum(0) for c in CORPORA}
        shares[key] = {c: (t / t.sum()).tolist() for c, t in totals.items()}
        class_shares[key] = {f"{c}: {name}": (v / v.sum()).tolist()
                             for c in CORPORA for name, v in class_counts[c][j].items()}
        js[key] = js_divergence(totals[CORPORA[0]], totals[CORPORA[1]])
        pooled = torch.cat([counts[c][j] for c in CORPORA])  # (2W, E)
        scores = []
        for _ in range(n_shuffles):
            perm = torch.randperm(pooled.shape[0], generator=generator)
            a, b = pooled[perm[:n_windows]].sum(0), pooled[perm[n_windows:]].sum(0)
            scores.append(js_divergence(a, b))
        control[key] = {"mean": statistics.fmean(scores), "max": max(scores)}
    return RoutingTable(
        layers=layers, num_experts=num_experts, corpora=list(CORPORA), tokens_per_corpus=n_windows * seq_len,
        shares=shares, class_shares=class_shares, js=js, js_control=control,
        config=dict(n_windows=n_windows, seq_len=seq_len, max_chars=max_chars, n_shuffles=n_shuffles, seed=seed),
    )


def routing_figure(table: RoutingTable, *, layer: int, view: str = "corpus"):
    """The lab's heatmap: expert shares per corpus (`view="corpus"`) or per corpus and byte class (`"byte class"`)."""
    from lablib.viz import moe as viz

    if layer not in table.layers:
        raise ValueError(f"layer {layer} has no MoE; choose one of {table.layers}")
    key = str(layer)
    if view == "corpus":
        rows = table.shares[key]
    elif view == "byte class":
        rows = table.class_shares[key]
    else:
        raise ValueError(f"view must be 'corpus' or 'byte class', got {view!r}")
    control = table.js_control[key]
    title = (f"Layer {layer}: share of routing assignments per expert (JS divergence Shakespeare vs Python "
             f"{table.js[key]:.3f} bits; shuffled labels: {control['mean']:.4f}, max {control['max']:.4f})")
    return viz.routing_heatmap_figure(rows, title=title)


# ----------------------------------------------------------------------------------------------------------------
# Capacity and dropped tokens, from router outputs
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RouterChoices:
    """The routing decisions of a trained model on validation text, grouped as the layer would see them.

    `indices[layer]`: (G, N, k) expert ids for G groups (batches) of N = batch_size · seq_len tokens each, from a
    dropless forward. Capacity is per group: C = ceil(cf · k · N / E) (`moe.token_choice_capacity`).
    """

    layers: list[int]
    num_experts: int
    top_k: int
    group_tokens: int
    indices: dict[int, torch.Tensor]

    def capacity(self, capacity_factor: float) -> int:
        return moe.token_choice_capacity(self.group_tokens, num_experts=self.num_experts, top_k=self.top_k,
                                         capacity_factor=capacity_factor)

    def dropped(self, layer: int, capacity_factor: float) -> int:
        """Assignments over capacity in `layer`, summed over the groups."""
        capacity = self.capacity(capacity_factor)
        return sum(int((~moe.capacity_mask(g, num_experts=self.num_experts, capacity=capacity)).sum())
                   for g in self.indices[layer])

    def dropped_fraction(self, layer: int, capacity_factor: float) -> float:
        """Fraction of `layer`'s assignments that a capacity factor `capacity_factor` drops."""
        return self.dropped(layer, capacity_factor) / self.indices[layer].numel()

    def load(self, layer: int, *, group: int = 0) -> list[int]:
        """Assignments per expert in one group."""
        return torch.bincount(self.indices[layer][group].reshape(-1), minlength=self.num_experts).tolist()


def router_choices(
    model: torch.nn.Module, *, n_groups: int = 4, batch_size: int = 32, seq_len: int | None = None,
    max_chars: int = 200_000, seed: int = 0,
) -> RouterChoices:
    """Route `n_groups` batches of random validation windows (both corpora) through `model`, without dropping.

    Each layer's decisions are read from one dropless forward, so they answer "what would capacity drop here" one
    layer at a time (with real dropping, a drop in layer 0 would change the inputs of layer 1 a little).
    """
    pairs = moe_layers(model)
    if not pairs:
        raise ValueError("router_choices needs a model with MoE layers")
    if any(layer.expert_choice for _, layer in pairs):
        raise ValueError("capacity dropping applies to token-choice routers; expert choice never drops")
    if any(layer.capacity_factor is not None for _, layer in pairs):
        raise ValueError("router_choices needs a dropless model (capacity_factor=None), to see every choice")
    seq_len = seq_len or model.config.seq_len
    val = data.text_corpus(list(CORPORA), max_chars=max_chars).val
    generator = torch.Generator().manual_seed(seed)
    x, _ = data.sample_lm_batch(val, batch_size=n_groups * batch_size, seq_len=seq_len, generator=generator)
    routed = _route_windows(model, x, batch_size=batch_size)
    top_k = routed[0].shape[-1]
    # (G·B, T, k) -> (G, B·T, k): the flattened token order of each batch, as in MoELayer
    indices = {layer: idx.reshape(n_groups, batch_size * seq_len, top_k)
               for (layer, _), idx in zip(pairs, routed)}
    return RouterChoices(layers=[i for i, _ in pairs], num_experts=pairs[0][1].num_routed_experts, top_k=top_k,
                         group_tokens=batch_size * seq_len, indices=indices)


CAPACITY_FACTORS = tuple(round(0.25 + 0.05 * i, 2) for i in range(56))  # 0.25 .. 3.0


def capacity_curves(choices: RouterChoices, capacity_factors: Sequence[float] = CAPACITY_FACTORS) -> dict:
    """{"layer i": (capacity factors, fraction of assignments dropped)} for the capacity panel."""
    factors = list(capacity_factors)
    return {f"layer {layer}": (factors, [choices.dropped_fraction(layer, cf) for cf in factors])
            for layer in choices.layers}


def capacity_figure(choices: RouterChoices, *, capacity_factor: float, layer: int, curves: dict | None = None):
    """The capacity panel: dropped fraction vs capacity factor, and `layer`'s per-expert load against capacity."""
    from lablib.viz import moe as viz

    if layer not in choices.layers:
        raise ValueError(f"layer {layer} has no MoE; choose one of {choices.layers}")
    curves = curves if curves is not None else capacity_curves(choices)
    capacity = choices.capacity(capacity_factor)
    dropped = choices.dropped_fraction(layer, capacity_factor)
    title = (f"capacity factor {capacity_factor:g}: C = {capacity} assignments per expert per group of "
             f"{choices.group_tokens} tokens; layer {layer} drops {dropped:.1%}")
    return viz.capacity_figure(curves, choices.load(layer), capacity=capacity, selected_cf=capacity_factor,
                               title=title)


# ----------------------------------------------------------------------------------------------------------------
# Balancing methods: expert load over training
# ----------------------------------------------------------------------------------------------------------------


def balance_label(method: str, bias_update_rate: float | None = None) -> str:
    """The key of one balancing run: "none", "aux_loss" or "bias u=0.001"."""
    _check_balance(method, bias_update_rate)
    return f"bias u={bias_update_rate:g}" if method == "bias" else method


@dataclass
class BalanceResult:
    """Expert load over training for each balancing method: `runs[label]` holds `method`, `bias_update_rate`,
    `steps`, `imbalance` (one list per MoE layer, max/mean load) and `val_loss` (keys from `balance_label`)."""

    variant: str
    seed: int
    bias_rates: list[float]
    runs: dict[str, dict[str, Any]]
    config: dict = field(default_factory=dict)

    def run(self, method: str, bias_update_rate: float | None = None) -> dict[str, Any]:
        label = balance_label(method, bias_update_rate if method == "bias" else None)
        if label not in self.runs:
            raise KeyError(f"no balancing run {label!r}; recorded: {sorted(self.runs)}")
        return self.runs[label]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "BalanceResult":
        return cls(**raw)


def balance_sweep(
    *,
    variant: str = "linear",
    bias_rates: Sequence[float] = (1e-4, 1e-3, 1e-2),
    seed: int = 0,
    steps: int = 300,
    load_every: int = 10,
    progress: bool = False,
    checkpoint_cache: cache_mod.CheckpointCache | None = None,
    **train_kwargs: Any,
) -> BalanceResult:
    """Train `variant` once per balancing method (bias: once per rate) and keep each run's load trace."""
    if variant not in ROUTER_VARIANTS or variant == "hash":
        raise ValueError(f"balancing needs a scored router variant, one of "
                         f"{sorted(v for v in ROUTER_VARIANTS if v != 'hash')}, got {variant!r}")
    plan = [("none", None), ("aux_loss", None)] + [("bias", float(u)) for u in bias_rates]
    runs = {}
    for method, rate in plan:
        r = train_router_lm(variant=variant, seed=seed, balance=method, bias_update_rate=rate, steps=steps,
                            load_every=load_every, progress=progress, checkpoint_cache=checkpoint_cache,
                            **train_kwargs)
        runs[balance_label(method, rate)] = dict(method=method, bias_update_rate=rate, steps=r.load_steps,
                                                 imbalance=r.load_imbalance, val_loss=r.val_loss)
    config = dict(variant=variant, bias_rates=[float(u) for u in bias_rates], seed=seed, steps=steps,
                  load_every=load_every, **train_kwargs)
    return BalanceResult(variant=variant, seed=seed, bias_rates=[float(u) for u in bias_rates], runs=runs,
                         config=config)


def final_imbalance(run: Mapping[str, Any], *, last: int = 5) -> float:
    """Mean max/mean load over the last `last` windows and all layers of one balancing run."""
    values = [v for layer in run["imbalance"] for v in layer[-last:]]
    return statistics.fmean(values)


def balance_figure(result: BalanceResult, *, method: str, bias_update_rate: float | None = None):
    """The balancing panel: the chosen run's load curves (one per layer), the unbalanced run in grey."""
    from lablib.viz import moe as viz

    run = result.run(method, bias_update_rate)
    curves = {f"layer {i}": (run["steps"], values) for i, values in enumerate(run["imbalance"])}
    reference = None
    if method != "none":
        none = result.run("none")
        reference = {f"no balancing, layer {i}": (none["steps"], v) for i, v in enumerate(none["imbalance"])}
    label = balance_label(method, bias_update_rate if method == "bias" else None)
    title = (f"{label}: final max/mean load {final_imbalance(run):.2f}, validation loss {run['val_loss']:.3f} "
             f"(no balancing: {final_imbalance(result.run('none')):.2f}, {result.run('none')['val_loss']:.3f})")
    return viz.expert_load_figure(curves, reference=reference, title=title)


# ----------------------------------------------------------------------------------------------------------------
# Equifinality: does routing topology change the loss by more than the seed spread?
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class EquifinalityResult(SeededLosses):
    """Validation loss per variant and seed (string keys, for JSON), and each variant's parameter ledger.

    `ledger[variant]` = {"total", "active_per_token", "router"} (router: learned router parameters).
    """

    variants: list[str]
    seeds: list[int]
    val_loss: dict[str, dict[str, float]]
    val_loss_by_corpus: dict[str, dict[str, dict[str, float]]]
    ledger: dict[str, dict[str, int]]
    config: dict = field(default_factory=dict)

    def subset(self, *, variants: Sequence[str], seeds: Sequence[int]) -> "EquifinalityResult":
        """The same result restricted to some variants and seeds (to compare a live run with the recording)."""
        missing = [v for v in variants if v not in self.val_loss]
        missing += [f"seed {s}" for s in seeds for v in variants if v in self.val_loss and str(s) not in self.val_loss[v]]
        if missing:
            raise KeyError(f"result has no entries for {sorted(set(missing))}")
        keep = [str(s) for s in seeds]
        return EquifinalityResult(
            variants=list(variants), seeds=list(seeds),
            val_loss={v: {s: self.val_loss[v][s] for s in keep} for v in variants},
            val_loss_by_corpus={v: {s: self.val_loss_by_corpus[v][s] for s in keep} for v in variants},
            ledger={v: self.ledger[v] for v in variants}, config=self.config,
        )


def equifinality_sweep(
    *,
    variants: Sequence[str] = ("linear", "cosine", "hash", "random_fixed"),
    seeds: Sequence[int] = (0,),
    progress: bool = False,
    checkpoint_cache: cache_mod.CheckpointCache | None = None,
    **train_kwargs: Any,
) -> EquifinalityResult:
    """Train every variant with every seed (cached checkpoints; `train_kwargs` go to `train_router_lm`)."""
    if not variants or not seeds:
        raise ValueError("variants and seeds must each be non-empty")
    for v in variants:
        _check_variant(v)
    val_loss, by_corpus, ledgers = {}, {}, {}
    for v in variants:
        val_loss[v], by_corpus[v] = {}, {}
        for s in seeds:
            r = train_router_lm(variant=v, seed=s, progress=False, checkpoint_cache=checkpoint_cache, **train_kwargs)
            val_loss[v][str(s)] = r.val_loss
            by_corpus[v][str(s)] = r.val_loss_by_corpus
            ledgers[v] = dict(total=r.param_ledger.total, active_per_token=r.param_ledger.active_per_token,
                              router=r.router_params)
            if progress:
                print(f"{v:>12} seed {s}: val loss {r.val_loss:.4f} "
                      f"({'cached' if r.from_cache else f'{r.history.seconds:.0f} s'})", flush=True)
    config = dict(variants=list(variants), seeds=list(seeds), **{**TRAIN_DEFAULTS, **MODEL_DEFAULTS, **train_kwargs})
    return EquifinalityResult(variants=list(variants), seeds=list(seeds), val_loss=val_loss,
                              val_loss_by_corpus=by_corpus, ledger=ledgers, config=config)


CLAIM = "routing topology changes validation loss by less than the seed spread"


def ppl_change(delta_loss: float) -> float:
    """Relative perplexity change of a loss difference (nats): exp(Δ) − 1."""
    return math.expm1(delta_loss)


def equifinality_verdict(
    result: EquifinalityResult,
    *,
    routers: Sequence[str] = tuple(ROUTER_VARIANTS),
    sanity: tuple[str, str] = SANITY_PAIR,
) -> Verdict:
    """Decide the claim from the numbers (all in nats of validation loss).

    * seed spread: the mean over routers of each router's seed range (max − min over its seeds);
    * topology effect: the largest difference between two routers' mean losses;
    * sanity check: the 1/4-width dense model must be worse than the same-active dense model by more than the seed
      spread, with no overlap of their seeds, or the runs are too short to separate anything and the verdict is
      inconclusive.

    Then: **holds** when the topology effect is below the seed spread; **does not hold at this scale** when some
    pair of routers is separated (difference of means above the spread and no overlap of their seeds);
    **inconclusive** otherwise.
    """
    missing = [v for v in (*routers, *sanity) if v not in result.val_loss]
    if missing:
        raise KeyError(f"the result lacks variants {missing}")
    if len(result.seeds) < 2:
        raise ValueError("a seed spread needs at least two seeds")
    means = {v: result.mean(v) for v in routers}
    ranges = {v: result.seed_range(v) for v in routers}
    spread = statistics.fmean(ranges.values())
    best, worst = min(means, key=means.get), max(means, key=means.get)
    effect = means[worst] - means[best]
    small, large = sanity
    sanity_gap = result.mean(small) - result.mean(large)
    sanity_ok = sanity_gap > spread and min(result.values(small)) > max(result.values(large))
    separated = []
    for a in routers:
        for b in routers:
            # a better than b, by more than the spread, every seed of a below every seed of b
            if means[b] - means[a] > spread and max(result.values(a)) < min(result.values(b)):
                separated.append((a, b))
    numbers = dict(
        mean=means, seed_range=ranges, seed_spread=spread, effect=effect, best=best, worst=worst,
        effect_ppl=ppl_change(effect), spread_ppl=ppl_change(spread), sanity_pair=list(sanity),
        sanity_gap=sanity_gap, sanity_ok=sanity_ok, separated=[list(p) for p in separated],
        ordering=sorted(routers, key=means.get),
    )
    if not sanity_ok:
        reason = (f"the sanity check fails: {sanity[0]} is only {sanity_gap:.3f} nats worse than {sanity[1]} "
                  f"(seed spread {spread:.3f}), so the runs cannot separate even that")
        return Verdict(CLAIM, "inconclusive", reason, numbers)
    if effect < spread:
        reason = (f"the routers' means differ by at most {effect:.3f} nats ({best} vs {worst}), below the seed "
                  f"spread of {spread:.3f} nats")
        return Verdict(CLAIM, "holds", reason, numbers)
    if separated:
        pairs = ", ".join(f"{a} < {b}" for a, b in separated)
        reason = (f"routing topology moves the loss by {effect:.3f} nats ({ppl_change(effect):+.1%} perplexity), "
                  f"more than the seed spread of {spread:.3f}, and these pairs separate on every seed: {pairs}")
        return Verdict(CLAIM, "does not hold at this scale", reason, numbers)
    reason = (f"the routers' means differ by {effect:.3f} nats, above the seed spread of {spread:.3f}, but no pair "
              "separates on every seed")
    return Verdict(CLAIM, "inconclusive", reason, numbers)


def format_equifinality_table(result: EquifinalityResult, *, digits: int = 3) -> str:
    """A plain-text table: variant, total / active / router parameters, loss per seed, mean and seed range."""
    seeds = " ".join(f"{'seed ' + str(s):>9}" for s in result.seeds)
    lines = [f"{'variant':<30} {'total':>9} {'active':>8} {'router':>6} {seeds} {'mean':>7} {'range':>6}"]
    for v in result.variants:
        led = result.ledger[v]
        losses = " ".join(f"{x:>9.{digits}f}" for x in result.values(v))
        lines.append(f"{VARIANT_LABELS.get(v, v):<30} {led['total']:>9,} {led['active_per_token']:>8,} "
                     f"{led['router']:>6,} {losses} {result.mean(v):>7.{digits}f} {result.seed_range(v):>6.{digits}f}")
    return "\n".join(lines)


def equifinality_figure(result: EquifinalityResult):
    """Validation loss per variant: mean bars, min-max error bars, one dot per seed."""
    from lablib.viz import moe as viz

    return viz.seed_spread_figure({VARIANT_LABELS.get(v, v): result.values(v) for v in result.variants},
                                  title=f"Validation loss, {len(result.seeds)} seeds per variant",
                                  y_title="validation loss (nats / byte)")


def compare_with_recorded(
    live: EquifinalityResult, recorded: EquifinalityResult, *, tolerance: float = 0.03
) -> list[str]:
    """Differences between a live run and the recording on the live run's variants and seeds ([] = agree).

    Validation losses must agree within `tolerance` nats (a different thread count or CPU changes the float
    summation order, and training amplifies that a little); the ledgers must be identical.
    """
    problems = []
    rec = recorded.subset(variants=live.variants, seeds=live.seeds)
    for v in live.variants:
        if live.ledger[v] != rec.ledger[v]:
            problems.append(f"{v}: ledger {live.ledger[v]} vs recorded {rec.ledger[v]}")
        for s in live.seeds:
            a, b = live.val_loss[v][str(s)], rec.val_loss[v][str(s)]
            if abs(a - b) > tolerance:
                problems.append(f"{v} seed {s}: validation loss {a:.4f} vs recorded {b:.4f}")
    return problems


# ----------------------------------------------------------------------------------------------------------------
# The recorded sweep
# ----------------------------------------------------------------------------------------------------------------

RECORDED_SEEDS = (0, 1, 2)
RECORDED_VARIANTS = (*ROUTER_VARIANTS, *DENSE_BASELINES)
RECORDED_BIAS_RATES = (1e-4, 1e-3, 1e-2)


@dataclass
class RecordedSweep:
    """What `python -m lablib sweep moe-routers` wrote: the Equifinality runs and the balancing runs."""

    equifinality: EquifinalityResult
    balance: BalanceResult
    recorded: str
    machine: str
    seconds: float


def recorded_moe_routers(path: Path | None = None) -> RecordedSweep:
    """The recorded sweep (made by `python -m lablib sweep moe-routers`)."""
    path = path or RESULTS_DIR / RECORD_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `python -m lablib sweep moe-routers` to record it")
    raw = json.loads(path.read_text())
    return RecordedSweep(
        equifinality=EquifinalityResult.from_dict(raw["result"]["equifinality"]),
        balance=BalanceResult.from_dict(raw["result"]["balance"]),
        recorded=raw["recorded"], machine=raw["machine"], seconds=raw["seconds"],
    )


def record_moe_routers(path: Path | None = None, *, progress: bool = True) -> Path:
    """Run the heavy sweep (4 routers and 2 dense baselines x 3 seeds, 5 balancing runs; about 6 minutes on 2 cores)
    from scratch (a temporary checkpoint cache, so nothing stale is reused) and write it with its machine and date."""
    import datetime as dt
    import os
    import platform
    import tempfile
    import time

    import lablib

    path = path or RESULTS_DIR / RECORD_FILE
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lablib-moe-sweep-") as tmp:
        fresh = cache_mod.CheckpointCache(tmp)
        equifinality = equifinality_sweep(variants=RECORDED_VARIANTS, seeds=RECORDED_SEEDS, progress=progress,
                                          checkpoint_cache=fresh)
        balance = balance_sweep(bias_rates=RECORDED_BIAS_RATES, checkpoint_cache=fresh)
    seconds = time.perf_counter() - start
    if progress:
        for label, run in balance.runs.items():
            print(f"balance {label:>14}: final max/mean load {final_imbalance(run):.2f}, val loss "
                  f"{run['val_loss']:.4f}", flush=True)
        print(f"sweep took {seconds:.0f} s", flush=True)
    record = dict(
        recorded=dt.date.today().isoformat(),
        machine=f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
                f"{platform.platform()}, 1-minute load average at the end {os.getloadavg()[0]:.2f}",
        versions=dict(lablib=lablib.__version__, torch=torch.__version__, python=platform.python_version()),
        command="python -m lablib sweep moe-routers",
        seconds=round(seconds, 1),
        result=dict(equifinality=equifinality.to_dict(), balance=balance.to_dict()),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Exercise checkers
# ----------------------------------------------------------------------------------------------------------------


def check_capacity(answer: int, *, num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> bool:
    """Exercise: compute an expert's capacity by hand. Prints a hint when the answer is off."""
    expected = moe.token_choice_capacity(num_tokens, num_experts=num_experts, top_k=top_k,
                                         capacity_factor=capacity_factor)
    if answer == expected:
        print(f"correct: C = ceil({capacity_factor:g} * {top_k} * {num_tokens} / {num_experts}) = {expected}")
        return True
    hint = "did you forget top_k?" if answer * top_k == expected or abs(answer * top_k - expected) <= top_k else \
        "C = ceil(capacity_factor * top_k * N / E)"
    print(f"not quite: {answer} is too {'low' if answer < expected else 'high'}; {hint}")
    return False


def check_js(answer: float, table: RoutingTable, *, layer: int) -> bool:
    """Exercise: compute the specialization score of `layer` from its two rows of shares."""
    expected = table.js[str(layer)]
    ok = abs(answer - expected) < 1e-3
    print("correct" if ok else "not quite: JS(P, Q) = (KL(P || M) + KL(Q || M)) / 2 with M = (P + Q) / 2, in bits "
          "(log base 2)")
    return ok
