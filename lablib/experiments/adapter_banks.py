"""Lab 03's seeded experiments: adapt a tiny LM pretrained on Shakespeare to Python source with every adapter kind of
`lablib.adapters`, at matched stored-parameter budgets, and check two papers' claims from the numbers.

* Budgets: three levels, each the stored count of a LoRA of rank 1, 2, 4 on the four Linears of every block
  (`TARGETS`); every other kind gets the configuration whose `adapter_ledger(...).stored` is that count (exactly for
  LoRA, NOLA, VB-LoRA and MoS; Compacter's shared slow factors add 64 numbers). `kind_config` lists them.
* Claims: MoS (Wang et al. 2025) and VB-LoRA (Li et al. 2024) save parameters over LoRA, i.e. at a matched budget
  they reach a lower adapted validation loss; and MoS's ablation, "differentiation is indispensable": pure sharing
  (`mos_pure`: every flag off, every layer the same A and B) loses to MoS at the same budget.
* Every run is one torch thread (numbers repeat between the recorded sweep and the lab's live subset) and cached by
  its configuration (`lablib.cache.cached_json`); the base LM by `cached_train`.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from lablib import adapters, data, models, train
from lablib import cache as cache_mod
from lablib.experiments.foundations import Verdict
from lablib.experiments.frontier import one_thread

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS_PATH = RESULTS_DIR / "adapter_banks.json"

TARGETS = ("attn.qkv", "attn.proj", "ffn.fc", "ffn.proj")
KINDS = ("lora", "nola", "vblora", "mos", "compacter", "mos_pure")
LEVELS = (0, 1, 2)
BASE = dict(d_model=64, n_layers=4, n_heads=4, seq_len=64, steps=300, batch_size=32, lr=3e-3, max_chars=200_000,
            seed=0, corpus="shakespeare")
RECORDED_SEEDS = (0, 1)
ADAPT = dict(corpus="python", max_chars=100_000, steps=100, batch_size=32, lr=1e-2)


def kind_config(kind: str, level: int) -> adapters.AdapterConfig:
    """The adapter of `kind` at budget level 0, 1, 2 (= the stored count of LoRA r = 1, 2, 4 on `TARGETS`).

    * lora: r = 1, 2, 4 (α = 2r);  nola: r = 4, 128 / 256 / 512 coefficients per factor;
    * vblora: (r, bank vectors of length 16) = (2, 128), (4, 256), (4, 768), top-2, storing top-k indices + weights;
    * mos: (active r, equivalent r) = (2, 1), (4, 2), (8, 4), one private rank vector from level 1 on (at level 0
      the pools are one rank vector per layer, all of it shared: privatization would leave nothing to share);
    * mos_pure: the same pools with every differentiation flag off and r = r_e · 4 (all pool rows, same in all layers);
    * compacter: r = 1, 2, 4 with phm_dim 4 (α = 2r).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    rank = (1, 2, 4)[level]
    targets = list(TARGETS)
    if kind == "lora":
        return adapters.LoraConfig(r=rank, alpha=2.0 * rank, target_modules=targets)
    if kind == "nola":
        return adapters.NolaConfig(r=4, alpha=8.0, num_basis=(128, 256, 512)[level], target_modules=targets)
    if kind == "vblora":
        r, h = ((2, 128), (4, 256), (4, 768))[level]
        return adapters.VBLoraConfig(r=r, num_vectors=h, vector_length=16, topk=2, save_only_topk_weights=True,
                                     target_modules=targets)
    if kind == "mos":
        r_e = rank
        return adapters.MosConfig(r=2 * r_e, alpha=4.0 * r_e, equivalent_r=r_e, private_r=1,
                                  shard_privatization=r_e > 1, target_modules=targets)
    if kind == "mos_pure":
        r = rank * BASE["n_layers"]
        return adapters.MosConfig(r=r, alpha=2.0 * r, equivalent_r=rank, subset_selection=False,
                                  pair_dissociation=False, vector_sharding=False, shard_privatization=False,
                                  target_modules=targets)
    return adapters.CompacterConfig(r=rank, alpha=2.0 * rank, phm_dim=4, target_modules=targets)


def pretrain_base(*, progress: bool = True, checkpoint_cache: cache_mod.CheckpointCache | None = None,
                  **overrides) -> tuple[models.TinyTransformer, train.History, bool]:
    """The base LM: `BASE` (overridable, e.g. fewer steps in tests) trained on Shakespeare, cached by its config."""
    unknown = set(overrides) - set(BASE)
    if unknown:
        raise ValueError(f"unknown base settings {sorted(unknown)}; known: {sorted(BASE)}")
    base = {**BASE, **overrides}
    config = models.TransformerConfig(vocab_size=data.ByteTokenizer.vocab_size, d_model=base["d_model"],
                                      n_layers=base["n_layers"], n_heads=base["n_heads"], seq_len=base["seq_len"])
    splits = data.text_corpus(base["corpus"], max_chars=base["max_chars"])

    def build() -> models.TinyTransformer:
        torch.manual_seed(base["seed"])
        return models.TinyTransformer(config)

    def fit(model) -> dict:
        with one_thread():
            history = train.train_lm(model, splits, steps=base["steps"], batch_size=base["batch_size"],
                                     lr=base["lr"], seed=base["seed"], eval_every=base["steps"], progress=progress)
        return history.to_dict()

    model, meta, from_cache = cache_mod.cached_train(dict(experiment="adapter_banks_base", **base), build=build,
                                                     fit=fit, cache=checkpoint_cache)
    return model, train.History.from_dict(meta), from_cache


def _usage_json(adapted) -> list[dict]:
    return [dict(bank=u.bank, factor=u.factor, layers=list(u.layers), counts=u.counts.tolist(),
                 private_from=u.private_from) for u in adapters.bank_usage(adapted)]


def adapt_run(base_model: torch.nn.Module, base_key: dict, *, kind: str, level: int, seed: int,
              adapt: dict | None = None, progress: bool = False,
              checkpoint_cache: cache_mod.CheckpointCache | None = None) -> dict:
    """Attach `kind_config(kind, level)` to a copy of the base, train it on Python source and return its numbers:
    stored / trainable (from `adapter_ledger`), adapted val loss, and the bank usage after training. Cached."""
    adapt = {**ADAPT, **(adapt or {})}
    config = kind_config(kind, level)
    run = dict(experiment="adapter_banks_run", base=base_key, adapt=adapt, kind=kind, level=level, seed=seed,
               adapter=config.to_dict() if hasattr(config, "to_dict") else asdict(config))

    def compute() -> dict:
        splits = data.text_corpus(adapt["corpus"], max_chars=adapt["max_chars"])
        with one_thread():
            torch.manual_seed(seed)
            adapted = adapters.attach_adapters(base_model, config)
            history = train.train_lm(adapted, splits, steps=adapt["steps"], batch_size=adapt["batch_size"],
                                     lr=adapt["lr"], seed=seed, eval_every=adapt["steps"], progress=progress)
        counts = adapters.adapter_ledger(adapted)
        return dict(stored=counts.stored, trainable=counts.trainable, val_loss=history.evals[-1]["val_loss"],
                    usage=_usage_json(adapted))

    return cache_mod.cached_json(run, compute, cache=checkpoint_cache)


@dataclass
class AdapterBankResult:
    """`stored[kind][level]`, `val_loss[kind][level][seed]` (string keys, JSON round trip), plus the base LM's loss on
    Python before adapting and the bank usage of seed 0 (`usage[kind][level]`)."""

    kinds: list[str]
    levels: list[int]
    seeds: list[int]
    stored: dict[str, dict[str, int]]
    val_loss: dict[str, dict[str, dict[str, float]]]
    base_val_loss: float
    usage: dict[str, dict[str, list]] = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def mean_loss(self, kind: str, level: int) -> float:
        return statistics.fmean(self.val_loss[kind][str(level)].values())

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> AdapterBankResult:
        return cls(**raw)


def adapter_bank_sweep(*, kinds: Sequence[str] = KINDS, levels: Sequence[int] = LEVELS, seeds: Sequence[int] = (0,),
                       base_overrides: dict | None = None, adapt: dict | None = None, progress: bool = True,
                       checkpoint_cache: cache_mod.CheckpointCache | None = None) -> AdapterBankResult:
    """Pretrain (or load) the base, then adapt every (kind, level, seed); each run cached on its own."""
    base_overrides = dict(base_overrides or {})
    base_model, _, _ = pretrain_base(progress=progress, checkpoint_cache=checkpoint_cache, **base_overrides)
    base_key = {**BASE, **base_overrides}
    adapt_full = {**ADAPT, **(adapt or {})}
    python = data.text_corpus(adapt_full["corpus"], max_chars=adapt_full["max_chars"])
    with one_thread():
        base_loss = train.evaluate_lm(base_model, python.val, batch_size=adapt_full["batch_size"],
                                      seq_len=base_model.config.seq_len, max_batches=8, seed=0)
    stored, losses, usage = {}, {}, {}
    for kind in kinds:
        stored[kind], losses[kind], usage[kind] = {}, {}, {}
        for level in levels:
            losses[kind][str(level)] = {}
            for seed in seeds:
                out = adapt_run(base_model, base_key, kind=kind, level=level, seed=seed, adapt=adapt,
                                checkpoint_cache=checkpoint_cache)
                stored[kind][str(level)] = out["stored"]
                losses[kind][str(level)][str(seed)] = round(out["val_loss"], 6)
                if seed == seeds[0]:
                    usage[kind][str(level)] = out["usage"]
    return AdapterBankResult(kinds=list(kinds), levels=list(levels), seeds=list(seeds), stored=stored,
                             val_loss=losses, base_val_loss=round(base_loss, 6), usage=usage,
                             config=dict(base=base_key, adapt=adapt_full, targets=list(TARGETS)))


# ----------------------------------------------------------------------------------------------------------------
# Verdicts
# ----------------------------------------------------------------------------------------------------------------


def paired_verdict(result: AdapterBankResult, *, kind: str, reference: str, claim: str,
                   margin: float = 0.005) -> Verdict:
    """Does `kind` reach a lower adapted loss than `reference` at matched budgets?

    Per seed, the difference loss(kind) − loss(reference) averaged over the budget levels both have. Holds: the mean
    difference is below −`margin` and every seed's difference is negative; does not hold at this scale: above
    +`margin` and every seed positive; otherwise inconclusive (within seed spread).
    """
    for name in (kind, reference):
        if name not in result.val_loss:
            raise KeyError(f"result has no runs of kind {name!r}")
    levels = [lv for lv in result.levels if str(lv) in result.val_loss[kind] and str(lv) in result.val_loss[reference]]
    per_seed = {}
    for seed in result.seeds:
        diffs = [result.val_loss[kind][str(lv)][str(seed)] - result.val_loss[reference][str(lv)][str(seed)]
                 for lv in levels]
        per_seed[seed] = statistics.fmean(diffs)
    mean = statistics.fmean(per_seed.values())
    by_level = {lv: result.mean_loss(kind, lv) - result.mean_loss(reference, lv) for lv in levels}
    numbers = dict(mean_diff=mean, per_seed=per_seed, by_level=by_level,
                   stored={lv: (result.stored[kind][str(lv)], result.stored[reference][str(lv)]) for lv in levels})
    text = f"{kind} − {reference} = {mean:+.3f} nats on average over {len(levels)} budgets and {len(per_seed)} seeds"
    if mean < -margin and all(d < 0 for d in per_seed.values()):
        return Verdict(claim, "holds", text, numbers)
    if mean > margin and all(d > 0 for d in per_seed.values()):
        return Verdict(claim, "does not hold at this scale", text, numbers)
    return Verdict(claim, "inconclusive (within seed spread)", text, numbers)


def lora_equivalent_budget(result: AdapterBankResult, *, kind: str, level: int) -> float | None:
    """The stored count LoRA would need for `kind`'s mean loss at `level` (log-linear interpolation of LoRA's mean
    loss between its budgets); None outside LoRA's range. Divided by `kind`'s stored count it is the saving factor."""
    target = result.mean_loss(kind, level)
    points = sorted((result.stored["lora"][str(lv)], result.mean_loss("lora", lv)) for lv in result.levels)
    for (b0, l0), (b1, l1) in zip(points, points[1:]):
        if min(l0, l1) <= target <= max(l0, l1) and l0 != l1:
            t = (target - l0) / (l1 - l0)
            return math.exp(math.log(b0) + t * (math.log(b1) - math.log(b0)))
    return None


def verdicts(result: AdapterBankResult) -> dict[str, Verdict]:
    """The lab's three verdicts, computed from the numbers."""
    return {
        "mos_vs_lora": paired_verdict(result, kind="mos", reference="lora",
                                      claim="MoS saves parameters over LoRA (lower loss at a matched stored budget)"),
        "vblora_vs_lora": paired_verdict(result, kind="vblora", reference="lora",
                                         claim="VB-LoRA saves parameters over LoRA (lower loss at a matched budget)"),
        "mos_ablation": paired_verdict(result, kind="mos", reference="mos_pure",
                                       claim="MoS: differentiation is indispensable (MoS beats pure sharing)"),
    }


# ----------------------------------------------------------------------------------------------------------------
# Recorded sweep
# ----------------------------------------------------------------------------------------------------------------


def recorded_adapter_banks(path: Path | None = None) -> AdapterBankResult:
    raw = json.loads(Path(path or RESULTS_PATH).read_text())
    return AdapterBankResult.from_dict(raw["result"])


def compare_with_recorded(live: AdapterBankResult, recorded: AdapterBankResult, *, tol: float = 0.02) -> list[str]:
    """Problems (empty = agreement): stored counts must be equal, losses within `tol` nats, for every live run."""
    problems = []
    for kind in live.kinds:
        for level in live.levels:
            if live.stored[kind][str(level)] != recorded.stored[kind][str(level)]:
                problems.append(f"{kind} level {level}: stored {live.stored[kind][str(level)]} vs recorded "
                                f"{recorded.stored[kind][str(level)]}")
            for seed in live.seeds:
                a = live.val_loss[kind][str(level)][str(seed)]
                b = recorded.val_loss[kind][str(level)][str(seed)]
                if abs(a - b) > tol:
                    problems.append(f"{kind} level {level} seed {seed}: loss {a:.4f} vs recorded {b:.4f}")
    return problems


def record_adapter_banks(path: Path | None = None, *, progress: bool = True) -> Path:
    """Record the full sweep (6 kinds x 3 budgets x `RECORDED_SEEDS`) with its machine and date. Runs come from the
    `LABLIB_CACHE` when present (keyed by their full configuration, so a hit is the same run)."""
    import datetime
    import os
    import platform

    import lablib

    result = adapter_bank_sweep(seeds=RECORDED_SEEDS, progress=progress)
    out = Path(path or RESULTS_PATH)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=f"{platform.machine()}, {os.cpu_count()} cores, training on 1 torch thread, {platform.platform()}",
        versions=dict(lablib=lablib.__version__, torch=torch.__version__, python=platform.python_version()),
        config=result.config, result=result.to_dict(),
    )
    out.write_text(json.dumps(payload, indent=1) + "\n")
    return out


def check_stored(answer: int, *, kind: str, level: int, model: torch.nn.Module) -> bool:
    """Exercise helper: your hand count of `kind_config(kind, level)`'s stored parameters on `model`."""
    truth = adapters.adapter_ledger(adapters.attach_adapters(model, kind_config(kind, level))).stored
    if answer == truth:
        print(f"correct: {truth:,} stored parameters")
        return True
    print(f"not quite: {answer:,} vs the ledger's {truth:,} (hint: count per layer, then x layers; shared banks once)")
    return False
