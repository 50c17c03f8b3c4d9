"""One small, deterministic training loop shared by every lab.

Every lab trains through `train`, so their numbers are comparable: the same optimizer, the same learning-rate
schedule, the same clipping and the same bookkeeping.

* **Optimizer**: AdamW (Loshchilov & Hutter, *Decoupled Weight Decay Regularization*, ICLR 2019,
  <https://arxiv.org/abs/1711.05101>) over the parameters with `requires_grad` (or the explicit `params`). Weight
  decay, when asked for, applies only to matrices and embeddings (`ndim >= 2`), never to biases or LayerNorm gains,
  following nanoGPT. Parameters the optimizer does not own are never changed.
* **Learning rate**: `schedule="cosine"` (the default) decays from `lr` at the first step to `0.1 * lr` at the last,
  with no warmup (SGDR-style cosine annealing, Loshchilov & Hutter 2017, <https://arxiv.org/abs/1608.03983>);
  `schedule="constant"` keeps `lr` throughout. `lr_at` is the formula, so a lab can plot it.
* **Gradient clipping** by the global L2 norm over all optimized parameters (`torch.nn.utils.clip_grad_norm_`);
  `grad_clip=None` turns it off.
* **Determinism**: the run seeds torch's RNG with `seed` (dropout and anything else that draws from it) inside
  `torch.random.fork_rng`, so two runs with the same seed, model and batches give bit-identical losses and weights
  on the CPU, and the caller's global RNG state is left as it was.
* **Modes**: `model.train()` while stepping, `model.eval()` under `torch.no_grad()` while evaluating. Afterwards
  every submodule gets back the train/eval flag it had before the call, so `train` leaves the model's modes as it
  found them (evaluate explicitly, or call `model.eval()`, before using it for inference).

Step numbering: `History.steps[t] = t` and `train_loss[t]` is the loss of the batch seen by the `t`-th update,
measured *before* that update (parameters θ_t). An eval recorded with `"step": s` was measured after `s` updates
(θ_s): with `eval_every=k` at s = 0, k, 2k, ..., and always once at s = steps (the final parameters).

Progress bars use `tqdm.auto` inside a Jupyter kernel and plain text `tqdm.std` elsewhere or when
`LABLIB_STATIC=1`; `progress=False` or `LABLIB_PROGRESS=0` hides them.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from lablib._env import in_ipython_kernel as _in_ipython_kernel

if TYPE_CHECKING:  # only for annotations: lablib.data is imported lazily where it is needed
    from lablib.data import ClassificationData, TextSplits

__all__ = [
    "SCHEDULES",
    "FINAL_LR_FRACTION",
    "History",
    "seed_everything",
    "lr_at",
    "train",
    "lm_loss",
    "classification_loss",
    "evaluate_lm",
    "evaluate_classifier",
    "train_lm",
    "train_classifier",
]

SCHEDULES = ("cosine", "constant")
# the cosine schedule ends at this fraction of the peak learning rate
FINAL_LR_FRACTION = 0.1

_FALSE_WORDS = frozenset({"0", "false", "no", "off"})
_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})


# ----------------------------------------------------------------------------------------------------------------
# History
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class History:
    """What a training run recorded.

    * `steps`, `train_loss`: one entry per update; `train_loss[t]` is measured before update `t` (see module doc).
    * `evals`: one dict per evaluation, each with `"step"` (updates done when measured) and the eval's metrics.
    * `seconds`: wall-clock seconds of the whole run, evaluations included.
    """

    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if len(self.steps) != len(self.train_loss):
            raise ValueError(
                f"History needs one train_loss per step, got {len(self.steps)} steps and "
                f"{len(self.train_loss)} losses"
            )
        for i, record in enumerate(self.evals):
            if "step" not in record:
                raise KeyError(f"History.evals[{i}] has no 'step' (keys: {sorted(record)})")

    def metrics(self) -> list[str]:
        """Names `final` accepts: "train_loss" and every metric some eval recorded."""
        names = {key for record in self.evals for key in record if key != "step"}
        return ["train_loss", *sorted(names)]

    def final(self, metric: str = "train_loss") -> float:
        """The last recorded value of `metric` ("train_loss" or a key of the evals)."""
        if metric == "train_loss":
            if not self.train_loss:
                raise ValueError("History has no training steps, so no final train_loss")
            return self.train_loss[-1]
        for record in reversed(self.evals):
            if metric in record and metric != "step":
                return record[metric]
        raise KeyError(f"History has no metric {metric!r}; it has {self.metrics()}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (lists of numbers); `History.from_dict` inverts it."""
        return {
            "steps": [int(s) for s in self.steps],
            "train_loss": [float(x) for x in self.train_loss],
            "evals": [dict(record) for record in self.evals],
            "seconds": float(self.seconds),
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> History:
        """Rebuild from `to_dict()` output (for example a cached run's metadata); extra keys are ignored."""
        if not isinstance(raw, Mapping):
            raise TypeError(f"History.from_dict needs a mapping, got {type(raw).__name__}")
        missing = [key for key in ("steps", "train_loss", "evals", "seconds") if key not in raw]
        if missing:
            raise KeyError(f"History.from_dict is missing keys {missing} (got {sorted(raw)})")
        return cls(
            steps=[int(s) for s in raw["steps"]],
            train_loss=[float(x) for x in raw["train_loss"]],
            evals=[dict(record) for record in raw["evals"]],
            seconds=float(raw["seconds"]),
        )


# ----------------------------------------------------------------------------------------------------------------
# Seeds, schedule, progress
# ----------------------------------------------------------------------------------------------------------------


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    # numpy's legacy seeding accepts 0 .. 2**32 - 1 only
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    return seed


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python's `random`, numpy's and torch's global RNGs; return a fresh `torch.Generator` seeded the same.

    Use it at the top of a notebook; library code prefers explicit generators.
    """
    import random

    import numpy as np

    seed = _check_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def lr_at(step: int, *, steps: int, lr: float, schedule: str = "cosine") -> float:
    """The learning rate used by update `step` (0-based) of a `steps`-long run."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not 0 <= step < steps:
        raise ValueError(f"step must be in [0, {steps}), got {step}")
    if schedule == "constant" or steps == 1:
        return lr
    lr_min = FINAL_LR_FRACTION * lr
    # lr_t = lr_min + (lr - lr_min) * (1 + cos(pi * t / (steps - 1))) / 2:  lr at t = 0, lr_min at t = steps - 1
    return lr_min + (lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * step / (steps - 1)))


def _env_flag(name: str) -> str:
    return os.environ.get(name, "").strip().lower()


def _progress_enabled(progress: bool) -> bool:
    return bool(progress) and _env_flag("LABLIB_PROGRESS") not in _FALSE_WORDS


def _progress_bar_class() -> type:
    """`tqdm.auto.tqdm` (a widget) in a live notebook, `tqdm.std.tqdm` (text on stderr) otherwise."""
    if _env_flag("LABLIB_STATIC") not in _TRUE_WORDS and _in_ipython_kernel():
        from tqdm.auto import tqdm

        return tqdm
    from tqdm.std import tqdm

    return tqdm


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------


def _check_positive(name: str, value: Any, *, integer: bool) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"{name} must be {'an int' if integer else 'a number'}, got {type(value).__name__}")
    if not value > 0 or (not integer and not math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def _optimized_params(model: nn.Module, params: Iterable[nn.Parameter] | None) -> list[torch.Tensor]:
    if params is None:
        chosen = [p for p in model.parameters() if p.requires_grad]
        if not chosen:
            raise ValueError("model has no parameters with requires_grad=True; nothing to train (or pass params=)")
        return chosen
    chosen, seen = [], set()
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{i}] must be a tensor/nn.Parameter, got {type(p).__name__}")
        if not p.requires_grad:
            raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) has requires_grad=False; it cannot be trained")
        if id(p) not in seen:  # a tied parameter listed twice is still one parameter
            seen.add(id(p))
            chosen.append(p)
    if not chosen:
        raise ValueError("params is empty; nothing to train")
    return chosen


def _restore_modes(model: nn.Module) -> Callable[[], None]:
    """Remember every submodule's train/eval flag; the returned function puts them back."""
    flags = [(module, module.training) for module in model.modules()]

    def restore() -> None:
        for module, training in flags:
            module.training = training

    return restore


def _run_eval(model: nn.Module, eval_fn: Callable[[nn.Module], Mapping[str, float]], step: int) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        metrics = eval_fn(model)
    model.train()
    if not isinstance(metrics, Mapping):
        raise TypeError(f"eval_fn must return a dict of metric name -> number, got {type(metrics).__name__}")
    if "step" in metrics:
        raise ValueError("eval_fn must not return a 'step' key; train records the step itself")
    record: dict[str, float] = {"step": step}
    for name, value in metrics.items():
        record[str(name)] = float(value.item() if isinstance(value, torch.Tensor) else value)
    return record


def train(
    model: nn.Module,
    *,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    steps: int,
    lr: float = 3e-3,
    weight_decay: float = 0.0,
    grad_clip: float | None = 1.0,
    eval_fn: Callable[[nn.Module], Mapping[str, float]] | None = None,
    eval_every: int | None = None,
    seed: int = 0,
    progress: bool = True,
    params: Iterable[nn.Parameter] | None = None,
    schedule: str = "cosine",
) -> History:
    """Train `model` in place for `steps` AdamW updates on `batches`; return the `History`.

    `loss_fn(model, batch)` returns a scalar loss tensor. `eval_fn(model)` returns metrics (a dict of floats); it runs
    under `torch.no_grad()` with the model in eval mode, every `eval_every` steps (from step 0) and once at the end.
    Raises ValueError naming the argument for steps/lr/eval_every <= 0 and FloatingPointError when the loss stops
    being finite (lower `lr`).
    """
    _check_positive("steps", steps, integer=True)
    _check_positive("lr", lr, integer=False)
    if eval_every is not None:
        _check_positive("eval_every", eval_every, integer=True)
        if eval_fn is None:
            raise ValueError("eval_every was given but eval_fn is None; pass eval_fn to evaluate")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    if grad_clip is not None:
        _check_positive("grad_clip", grad_clip, integer=False)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    seed = _check_seed(seed)

    trainable = _optimized_params(model, params)
    # decoupled weight decay on matrices/embeddings only; biases and norm gains are left alone (nanoGPT convention)
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
    batch_iter: Iterator[Any] = iter(batches)
    history = History()
    restore_modes = _restore_modes(model)
    cuda_devices = sorted({p.device.index or 0 for p in trainable if p.device.type == "cuda"})
    bar = _progress_bar_class()(total=steps, mininterval=0.5, leave=True) if _progress_enabled(progress) else None

    start = time.perf_counter()
    try:
        # a private RNG stream for the run: seeded here, the caller's global state restored afterwards
        with torch.random.fork_rng(devices=cuda_devices, device_type="cuda"):
            # seed exactly the generators that were forked (torch.manual_seed would also reseed other GPUs for good)
            torch.default_generator.manual_seed(seed)
            for index in cuda_devices:
                with torch.cuda.device(index):
                    torch.cuda.manual_seed(seed)
            model.train()
            for step in range(steps):
                if eval_every is not None and step % eval_every == 0:
                    history.evals.append(_run_eval(model, eval_fn, step))
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, steps=steps, lr=lr, schedule=schedule)
                try:
                    batch = next(batch_iter)
                except StopIteration:
                    raise ValueError(f"batches ran out after {step} batches; train needs steps={steps}") from None

                loss = loss_fn(model, batch)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                    raise ValueError(f"loss_fn must return a scalar tensor, got {shape}")
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"loss became {loss_value} at step {step} (lr={lr}); try a lower lr")

                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip is not None:
                    # g <- g * min(1, grad_clip / ||g||_2), the norm taken over all optimized parameters jointly
                    nn.utils.clip_grad_norm_(trainable, grad_clip)
                optimizer.step()

                history.steps.append(step)
                history.train_loss.append(loss_value)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
                    bar.update(1)
            if eval_fn is not None:
                history.evals.append(_run_eval(model, eval_fn, steps))
    finally:
        restore_modes()
        # grads of the last step are not part of the result; free them
        optimizer.zero_grad(set_to_none=True)
        if bar is not None:
            bar.close()
    history.seconds = time.perf_counter() - start
    return history


# ----------------------------------------------------------------------------------------------------------------
# Losses and evaluation
# ----------------------------------------------------------------------------------------------------------------


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _unpack_pair(batch: Any, *, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"{what} expects a batch (inputs, targets), got {type(batch).__name__}")
    return batch[0], batch[1]


def _with_aux(loss: torch.Tensor, output: Any) -> torch.Tensor:
    aux_loss = getattr(output, "aux_loss", None)
    return loss if aux_loss is None else loss + aux_loss


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Training loss of a language model: `model(x, y).loss + model(x, y).aux_loss` (aux: e.g. MoE balancing)."""
    x, y = _unpack_pair(batch, what="lm_loss")
    device = _model_device(model)
    output = model(x.to(device), y.to(device))
    loss = getattr(output, "loss", None)
    if loss is None:
        raise ValueError(f"lm_loss needs model(x, targets) to return an object with .loss, got {type(output).__name__}")
    return _with_aux(loss, output)


def _logits_of(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def classification_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of `model(x)` (logits, or an object with `.logits` and optional `.aux_loss`) against y."""
    x, y = _unpack_pair(batch, what="classification_loss")
    device = _model_device(model)
    output = model(x.to(device))
    return _with_aux(F.cross_entropy(_logits_of(output), y.to(device)), output)


def evaluate_lm(
    model: nn.Module, tokens: torch.Tensor, *, batch_size: int, seq_len: int, max_batches: int, seed: int = 0
) -> float:
    """Mean next-token cross-entropy (nats) over `max_batches` batches of random windows of `tokens`.

    The windows are drawn from a `torch.Generator` seeded with `seed`, so every call with the same arguments scores
    the same windows; aux losses are not included. Runs in eval mode under no_grad; the model's modes are restored.
    """
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("max_batches", max_batches)):
        _check_positive(name, value, integer=True)
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 1:
        raise ValueError(f"tokens must be a 1-D tensor, got {getattr(tokens, 'shape', type(tokens).__name__)}")
    if tokens.numel() < seq_len + 1:
        raise ValueError(f"tokens has {tokens.numel()} entries, fewer than seq_len + 1 = {seq_len + 1}")
    generator = torch.Generator().manual_seed(_check_seed(seed))
    device = _model_device(model)
    offsets = torch.arange(seq_len)
    restore_modes = _restore_modes(model)
    model.eval()
    total = 0.0
    try:
        with torch.no_grad():
            for _ in range(max_batches):
                starts = torch.randint(0, tokens.numel() - seq_len, (batch_size, 1), generator=generator)
                # x[b, t] = tokens[start_b + t], y[b, t] = tokens[start_b + t + 1]:  both (batch_size, seq_len)
                x, y = tokens[starts + offsets], tokens[starts + offsets + 1]
                x, y = x.to(device), y.to(device)
                output = model(x, y)
                loss = getattr(output, "loss", None)
                if loss is None:  # a model that only returns logits (B, T, V)
                    logits = _logits_of(output)
                    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
                total += float(loss)
    finally:
        restore_modes()
    # equal-sized batches, so the mean of batch means is the mean over all predicted tokens
    return total / max_batches


def evaluate_classifier(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1024
) -> dict[str, float]:
    """`{"loss": mean cross-entropy, "accuracy": fraction of argmax == y}` over all of (x, y), in eval mode."""
    _check_positive("batch_size", batch_size, integer=True)
    if y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same number of examples with y 1-D, got {tuple(x.shape)}, "
                         f"{tuple(y.shape)}")
    if y.numel() == 0:
        raise ValueError("cannot evaluate on zero examples")
    device = _model_device(model)
    restore_modes = _restore_modes(model)
    model.eval()
    loss_sum, correct = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, y.numel(), batch_size):
                xb, yb = x[start : start + batch_size].to(device), y[start : start + batch_size].to(device)
                logits = _logits_of(model(xb))  # (batch, num_classes)
                loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
                correct += int((logits.argmax(dim=-1) == yb).sum())
    finally:
        restore_modes()
    return {"loss": loss_sum / y.numel(), "accuracy": correct / y.numel()}


# ----------------------------------------------------------------------------------------------------------------
# Convenience wrappers for the labs' two kinds of tasks
# ----------------------------------------------------------------------------------------------------------------


def train_lm(
    model: nn.Module,
    splits: TextSplits,
    *,
    steps: int,
    batch_size: int = 32,
    seq_len: int | None = None,
    lr: float = 3e-3,
    seed: int = 0,
    eval_every: int | None = None,
    eval_batches: int = 8,
    progress: bool = True,
    **train_kwargs: Any,
) -> History:
    """Train a language model on `splits.train` (random windows from `lablib.data.lm_batches`, seeded by `seed`).

    Evals record `"val_loss"` = `evaluate_lm` on `splits.val` over `eval_batches` batches; the eval windows use
    seed 0 whatever the training seed, so runs are scored on the same text. `seq_len` defaults to
    `model.config.seq_len`. Other keywords (`weight_decay`, `grad_clip`, `schedule`, `params`) go to `train`.
    """
    if seq_len is None:
        seq_len = getattr(getattr(model, "config", None), "seq_len", None)
        if seq_len is None:
            raise ValueError("model has no config.seq_len; pass seq_len= explicitly")
    _check_positive("batch_size", batch_size, integer=True)
    _check_positive("seq_len", seq_len, integer=True)
    _check_positive("eval_batches", eval_batches, integer=True)
    val_tokens = splits.val

    def eval_fn(m: nn.Module) -> dict[str, float]:
        return {"val_loss": evaluate_lm(m, val_tokens, batch_size=batch_size, seq_len=seq_len,
                                        max_batches=eval_batches, seed=0)}

    from lablib import data  # lazily: train.py itself does not need the data layer

    batches = data.lm_batches(splits.train, batch_size=batch_size, seq_len=seq_len, seed=seed)
    return train(model, batches=batches, loss_fn=lm_loss, steps=steps, lr=lr, eval_fn=eval_fn,
                 eval_every=eval_every, seed=seed, progress=progress, **train_kwargs)


def train_classifier(
    model: nn.Module,
    data: ClassificationData,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    eval_every: int | None = None,
    progress: bool = True,
    **train_kwargs: Any,
) -> History:
    """Train a classifier on `data.x_train, data.y_train` (shuffled minibatches from `lablib.data`).

    Evals record `"val_loss"` and `"val_accuracy"` from `evaluate_classifier` on the validation split. Other keywords
    (`weight_decay`, `grad_clip`, `schedule`, `params`) go to `train`.
    """
    _check_positive("batch_size", batch_size, integer=True)
    x_val, y_val = data.x_val, data.y_val

    def eval_fn(m: nn.Module) -> dict[str, float]:
        metrics = evaluate_classifier(m, x_val, y_val)
        return {"val_loss": metrics["loss"], "val_accuracy": metrics["accuracy"]}

    from lablib import data as data_module  # lazily: train.py itself does not need the data layer

    batches = data_module.classification_batches(data.x_train, data.y_train, batch_size=batch_size, seed=seed)
    return train(model, batches=batches, loss_fn=classification_loss, steps=steps, lr=lr, eval_fn=eval_fn,
                 eval_every=eval_every, seed=seed, progress=progress, **train_kwargs)
