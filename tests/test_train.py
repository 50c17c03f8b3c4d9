"""Tests for lablib.train, on tiny self-contained models (no dependency on lablib.models / lablib.data except the
two wrapper tests at the end, which skip while lablib.data is missing)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import tqdm.auto
import tqdm.std
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from lablib import train as tr

# ----------------------------------------------------------------------------------------------------------------
# Tiny stand-ins
# ----------------------------------------------------------------------------------------------------------------


def tiny_classifier(*, seed: int = 0, dropout: float = 0.0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 3))


def classification_stream(*, seed: int = 0, batch_size: int = 16):
    """Infinite seeded batches of one linearly separable 3-class problem (the teacher is the same for every seed)."""
    teacher = torch.randn(4, 3, generator=torch.Generator().manual_seed(99))
    gen = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randn(batch_size, 4, generator=gen)
        yield x, (x @ teacher).argmax(dim=1)


def fixed_eval_set(n: int = 64):
    stream = classification_stream(seed=123, batch_size=n)
    return next(stream)


@dataclass
class ToyLMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None
    aux_loss: torch.Tensor


class ToyLM(nn.Module):
    """A bigram table: logits[b, t] = table[idx[b, t]]; with an optional auxiliary loss like MoE's balancing loss."""

    def __init__(self, *, vocab_size: int = 8, aux_weight: float = 0.0, seq_len: int = 6) -> None:
        super().__init__()
        self.table = nn.Embedding(vocab_size, vocab_size)
        self.aux_weight = aux_weight
        self.config = SimpleNamespace(seq_len=seq_len, vocab_size=vocab_size)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> ToyLMOutput:
        logits = self.table(idx)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return ToyLMOutput(logits, loss, self.aux_weight * self.table.weight.square().mean())


def train_small(model: nn.Module, **overrides) -> tr.History:
    x_val, y_val = fixed_eval_set()
    kwargs = dict(
        batches=classification_stream(seed=1),
        loss_fn=tr.classification_loss,
        steps=20,
        lr=1e-2,
        progress=False,
    )
    kwargs.update(overrides)
    if kwargs.get("eval_every") is not None and "eval_fn" not in kwargs:
        kwargs["eval_fn"] = lambda m: tr.evaluate_classifier(m, x_val, y_val)
    return tr.train(model, **kwargs)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------


def test_train_learns_and_records_history():
    model = tiny_classifier()
    x_val, y_val = fixed_eval_set()
    before = tr.evaluate_classifier(model, x_val, y_val)
    history = train_small(model, steps=60, eval_every=20)
    after = tr.evaluate_classifier(model, x_val, y_val)

    assert history.steps == list(range(60))
    assert len(history.train_loss) == 60 and all(math.isfinite(x) for x in history.train_loss)
    # periodic evals from step 0, plus the final one at step == steps
    assert [e["step"] for e in history.evals] == [0, 20, 40, 60]
    assert history.evals[0]["loss"] == pytest.approx(before["loss"])
    assert history.evals[-1] == {"step": 60, **after}
    assert history.final("accuracy") == after["accuracy"] and after["accuracy"] > 0.8
    assert sum(history.train_loss[-10:]) < 0.6 * sum(history.train_loss[:10])
    assert history.seconds > 0


def test_final_eval_recorded_even_when_steps_not_a_multiple_and_without_eval_every():
    history = train_small(tiny_classifier(), steps=7, eval_every=3)
    assert [e["step"] for e in history.evals] == [0, 3, 6, 7]
    only_final = train_small(tiny_classifier(), steps=5, eval_fn=lambda m: {"answer": 42})
    assert only_final.evals == [{"step": 5, "answer": 42.0}]
    assert train_small(tiny_classifier(), steps=3).evals == []


def test_train_is_bit_deterministic_for_a_seed_and_leaves_global_rng_alone():
    runs = []
    for _ in range(2):
        model = tiny_classifier(dropout=0.3)
        rng_before = torch.get_rng_state()
        history = train_small(model, steps=15, eval_every=5, seed=7)
        assert torch.equal(torch.get_rng_state(), rng_before)
        runs.append((history, weights(model)))
    (h1, w1), (h2, w2) = runs
    assert h1.train_loss == h2.train_loss and h1.evals == h2.evals
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    # the seed matters: dropout masks differ
    other = train_small(tiny_classifier(dropout=0.3), steps=15, seed=8)
    assert other.train_loss != h1.train_loss


class LinearObjective(nn.Module):
    """loss = <w, c>: a constant gradient c, so each AdamW update is exactly lr_t * c / (|c| + eps)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3, dtype=torch.float64))
        self.c = torch.tensor([2.0, -0.5, 1.0], dtype=torch.float64)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_updates_follow_the_lr_schedule(schedule):
    model = LinearObjective()
    trajectory = []

    def loss_fn(m, batch):
        trajectory.append(m.w.detach().clone())
        return (m.w * m.c).sum()

    steps, lr = 6, 0.05
    tr.train(model, batches=iter(lambda: None, 1), loss_fn=loss_fn, steps=steps, lr=lr, grad_clip=None,
             schedule=schedule, progress=False)
    trajectory.append(model.w.detach().clone())
    eps = 1e-8  # AdamW's default
    for t in range(steps):
        # Adam with a constant gradient: m_hat = c, v_hat = c^2  ->  step = lr_t * c / (|c| + eps)
        expected = -tr.lr_at(t, steps=steps, lr=lr, schedule=schedule) * model.c / (model.c.abs() + eps)
        torch.testing.assert_close(trajectory[t + 1] - trajectory[t], expected, rtol=1e-6, atol=0)


def test_lr_at_formula():
    assert tr.lr_at(0, steps=5, lr=1.0) == 1.0
    assert tr.lr_at(4, steps=5, lr=1.0) == pytest.approx(0.1)
    # halfway: the cosine is 0, so halfway between 1 and 0.1
    assert tr.lr_at(2, steps=5, lr=1.0) == pytest.approx(0.55)
    assert tr.lr_at(1, steps=5, lr=2.0) == pytest.approx(0.2 + 1.8 * (1 + math.cos(math.pi / 4)) / 2)
    assert tr.lr_at(0, steps=1, lr=0.3) == 0.3
    assert [tr.lr_at(t, steps=4, lr=0.3, schedule="constant") for t in range(4)] == [0.3] * 4
    with pytest.raises(ValueError, match="step must be in"):
        tr.lr_at(5, steps=5, lr=1.0)
    with pytest.raises(ValueError, match="schedule"):
        tr.lr_at(0, steps=5, lr=1.0, schedule="linear")


def _record_grad_norms(norms: list[float]):
    def hook(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    return register_optimizer_step_pre_hook(hook)


@pytest.mark.parametrize("grad_clip", [None, 0.01])
def test_gradients_are_clipped_by_global_norm(grad_clip):
    norms: list[float] = []
    handle = _record_grad_norms(norms)
    try:
        # a loss scaled up 1000x: raw gradient norms far above 1
        train_small(tiny_classifier(), steps=5, grad_clip=grad_clip,
                    loss_fn=lambda m, b: 1000.0 * tr.classification_loss(m, b))
    finally:
        handle.remove()
    assert len(norms) == 5
    if grad_clip is None:
        assert min(norms) > 1.0
    else:
        # the joint norm lands on the threshold (per-tensor clipping would give up to sqrt(4) times more)
        assert all(grad_clip * 0.999 <= n <= grad_clip * 1.000001 for n in norms), norms


def test_only_trainable_or_given_params_change():
    model = tiny_classifier()
    model[0].requires_grad_(False)
    before = weights(model)
    train_small(model, weight_decay=0.1)
    assert torch.equal(model[0].weight, before["0.weight"]) and torch.equal(model[0].bias, before["0.bias"])
    assert model[0].weight.grad is None
    assert not torch.equal(model[3].weight, before["3.weight"])

    # explicit params: only the last layer's bias moves, although everything requires grad
    model = tiny_classifier()
    before = weights(model)
    train_small(model, params=[model[3].bias, model[3].bias])
    changed = {k for k in before if not torch.equal(before[k], model.state_dict()[k])}
    assert changed == {"3.bias"}


def test_modes_during_and_after_training():
    model = tiny_classifier()
    model.eval()
    model[2].train()  # one submodule deliberately in another mode
    seen = {"train": set(), "eval": set()}

    def loss_fn(m, batch):
        seen["train"].add(m.training and m[2].training)
        return tr.classification_loss(m, batch)

    def eval_fn(m):
        seen["eval"].add(m.training or m[2].training)
        return {}

    train_small(model, loss_fn=loss_fn, eval_fn=eval_fn, eval_every=5, steps=10)
    assert seen == {"train": {True}, "eval": {False}}
    assert not model.training and model[2].training and not model[0].training


def test_bad_inputs_name_the_argument():
    model = tiny_classifier()
    for kwargs, pattern in [
        (dict(steps=0), "steps"),
        (dict(steps=-3), "steps"),
        (dict(lr=0.0), "lr"),
        (dict(lr=-1e-3), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(eval_every=0, eval_fn=lambda m: {}), "eval_every"),
        (dict(eval_every=-1, eval_fn=lambda m: {}), "eval_every"),
        (dict(eval_every=2), "eval_fn"),
        (dict(grad_clip=0.0), "grad_clip"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(schedule="linear"), "schedule"),
        (dict(seed=-1), "seed"),
        (dict(batches=iter([]), steps=2), "ran out after 0"),
        (dict(loss_fn=lambda m, b: m(b[0])), r"scalar tensor, got \(16, 3\)"),
        (dict(eval_fn=lambda m: {"step": 1.0}), "'step'"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            tr.train(model, **{**dict(batches=classification_stream(), loss_fn=tr.classification_loss, steps=3,
                                      progress=False), **kwargs})
    with pytest.raises(TypeError, match="steps must be an int"):
        tr.train(model, batches=classification_stream(), loss_fn=tr.classification_loss, steps=2.0)
    frozen = tiny_classifier().requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters with requires_grad"):
        train_small(frozen)
    with pytest.raises(ValueError, match="requires_grad=False"):
        train_small(tiny_classifier(), params=list(frozen.parameters()))
    with pytest.raises(FloatingPointError, match="step 0"):
        train_small(tiny_classifier(), loss_fn=lambda m, b: tr.classification_loss(m, b) * float("nan"))
    with pytest.raises(TypeError, match="eval_fn must return a dict"):
        train_small(tiny_classifier(), eval_fn=lambda m: 0.5)


# ----------------------------------------------------------------------------------------------------------------
# Progress bars
# ----------------------------------------------------------------------------------------------------------------


def test_progress_bar_text_when_static_and_hidden_on_request(monkeypatch, capsys):
    monkeypatch.setenv("LABLIB_STATIC", "1")
    monkeypatch.delenv("LABLIB_PROGRESS", raising=False)
    train_small(tiny_classifier(), steps=5, progress=True)
    captured = capsys.readouterr()
    assert "5/5" in captured.err and "loss=" in captured.err and captured.out == ""

    train_small(tiny_classifier(), steps=5, progress=False)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("LABLIB_PROGRESS", "0")
    train_small(tiny_classifier(), steps=5, progress=True)
    assert capsys.readouterr().err == ""


def test_progress_bar_class_notebook_vs_text(monkeypatch):
    class NotebookBar:
        pass

    monkeypatch.setattr(tqdm.auto, "tqdm", NotebookBar)
    monkeypatch.delenv("LABLIB_STATIC", raising=False)
    monkeypatch.setattr(tr, "_in_ipython_kernel", lambda: True)
    assert tr._progress_bar_class() is NotebookBar
    monkeypatch.setenv("LABLIB_STATIC", "1")
    assert tr._progress_bar_class() is tqdm.std.tqdm
    monkeypatch.delenv("LABLIB_STATIC")
    monkeypatch.setattr(tr, "_in_ipython_kernel", lambda: False)
    assert tr._progress_bar_class() is tqdm.std.tqdm


# ----------------------------------------------------------------------------------------------------------------
# History, seeds
# ----------------------------------------------------------------------------------------------------------------


def test_history_round_trips_through_json():
    history = train_small(tiny_classifier(), steps=4, eval_every=2)
    raw = json.loads(json.dumps(history.to_dict()))
    assert tr.History.from_dict(raw) == history
    assert tr.History.from_dict({**raw, "extra": 1}) == history
    assert history.metrics() == ["train_loss", "accuracy", "loss"]
    assert history.final() == history.train_loss[-1]
    with pytest.raises(KeyError, match=r"no metric 'bleu'; it has \['train_loss', 'accuracy', 'loss'\]"):
        history.final("bleu")
    with pytest.raises(KeyError, match="missing keys \\['seconds'\\]"):
        tr.History.from_dict({k: v for k, v in raw.items() if k != "seconds"})
    with pytest.raises(ValueError, match="one train_loss per step"):
        tr.History(steps=[0, 1], train_loss=[1.0])
    with pytest.raises(KeyError, match="no 'step'"):
        tr.History(evals=[{"loss": 1.0}])


def test_seed_everything_seeds_all_global_rngs():
    import random

    import numpy as np

    gen = tr.seed_everything(3)
    first = (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=gen))
    gen = tr.seed_everything(3)
    again = (random.random(), np.random.rand(), torch.rand(1), torch.rand(1, generator=gen))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2]) and torch.equal(first[3], again[3])
    with pytest.raises(ValueError, match="seed must be in"):
        tr.seed_everything(2**32)
    with pytest.raises(TypeError, match="seed must be an int"):
        tr.seed_everything(1.5)


# ----------------------------------------------------------------------------------------------------------------
# Losses and evaluation against hand-computed references
# ----------------------------------------------------------------------------------------------------------------


def test_lm_loss_adds_aux_loss():
    torch.manual_seed(0)
    model = ToyLM(aux_weight=0.5)
    x, y = torch.randint(0, 8, (2, 5)), torch.randint(0, 8, (2, 5))
    logits = model.table.weight[x]  # (2, 5, 8)
    ce = -logits.log_softmax(-1).gather(-1, y[..., None]).mean()
    expected = ce + 0.5 * model.table.weight.square().mean()
    torch.testing.assert_close(tr.lm_loss(model, (x, y)), expected)
    with pytest.raises(TypeError, match="batch"):
        tr.lm_loss(model, x)

    class NoLoss(nn.Module):
        def forward(self, x, y):
            return x.float()

    with pytest.raises(ValueError, match=r"\.loss"):
        tr.lm_loss(NoLoss(), (x, y))


def test_classification_loss_matches_log_softmax():
    model = tiny_classifier()
    x, y = next(classification_stream())
    logits = model(x)
    expected = -logits.log_softmax(-1)[torch.arange(len(y)), y].mean()
    torch.testing.assert_close(tr.classification_loss(model, (x, y)), expected)


def test_evaluate_lm_uniform_and_perfect_models():
    vocab = 8
    tokens = torch.arange(200) % vocab  # 0 1 2 ... 7 0 1 ...: the next token is always (t + 1) % vocab
    model = ToyLM(vocab_size=vocab)
    with torch.no_grad():
        model.table.weight.zero_()
    # all-zero logits: every prediction is uniform, so the cross-entropy is ln(vocab) exactly
    uniform = tr.evaluate_lm(model, tokens, batch_size=4, seq_len=6, max_batches=3, seed=0)
    assert uniform == pytest.approx(math.log(vocab), abs=1e-6)
    with torch.no_grad():
        model.table.weight[torch.arange(vocab), (torch.arange(vocab) + 1) % vocab] = 30.0
    perfect = tr.evaluate_lm(model, tokens, batch_size=4, seq_len=6, max_batches=3, seed=0)
    assert perfect < 1e-10


def test_evaluate_lm_windows_are_shifted_pairs_and_seeded():
    seen = []

    class Recorder(ToyLM):
        def forward(self, idx, targets=None):
            seen.append((idx.clone(), targets.clone(), self.training, torch.is_grad_enabled()))
            return super().forward(idx, targets)

    torch.manual_seed(0)
    model = Recorder()
    tokens = torch.randint(0, 8, (50,))
    a = tr.evaluate_lm(model, tokens, batch_size=3, seq_len=5, max_batches=4, seed=1)
    assert len(seen) == 4 and model.training  # mode restored
    for x, y, training, grad in seen:
        assert x.shape == y.shape == (3, 5) and not training and not grad
        for row_x, row_y in zip(x, y):
            # each row is tokens[s : s + 5] for some start s, and y is the same window one token later
            starts = [s for s in range(50 - 5) if torch.equal(tokens[s : s + 5], row_x)
                      and torch.equal(tokens[s + 1 : s + 6], row_y)]
            assert starts
    # the reference: the mean of the per-batch cross-entropies, recomputed by hand
    reference = sum(
        float(-model.table.weight.detach()[x].log_softmax(-1).gather(-1, y[..., None]).mean()) for x, y, _, _ in seen
    ) / 4
    assert a == pytest.approx(reference, rel=1e-6)
    assert tr.evaluate_lm(model, tokens, batch_size=3, seq_len=5, max_batches=4, seed=1) == a
    assert tr.evaluate_lm(model, tokens, batch_size=3, seq_len=5, max_batches=4, seed=2) != a
    with pytest.raises(ValueError, match="fewer than seq_len"):
        tr.evaluate_lm(model, tokens[:5], batch_size=3, seq_len=5, max_batches=1)
    with pytest.raises(ValueError, match="1-D"):
        tr.evaluate_lm(model, tokens.view(5, 10), batch_size=3, seq_len=5, max_batches=1)
    with pytest.raises(ValueError, match="max_batches"):
        tr.evaluate_lm(model, tokens, batch_size=3, seq_len=5, max_batches=0)


def test_evaluate_classifier_hand_worked():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))  # logits = x
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 0.0]])
    y = torch.tensor([0, 1, 1, 0])
    # predictions 0, 1, 0, 0 (ties go to the first class): 3 of 4 right
    expected_loss = (
        math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1)) + math.log(1 + math.exp(2)) + math.log(2)
    ) / 4
    for batch_size in (1024, 3):
        metrics = tr.evaluate_classifier(model, x, y, batch_size=batch_size)
        assert metrics["accuracy"] == 0.75
        assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-6)
    with pytest.raises(ValueError, match="same number of examples"):
        tr.evaluate_classifier(model, x, y[:3])


# ----------------------------------------------------------------------------------------------------------------
# Wrappers (these use lablib.data's batch iterators)
# ----------------------------------------------------------------------------------------------------------------


def test_train_lm_wrapper():
    pytest.importorskip("lablib.data")
    torch.manual_seed(0)
    model = ToyLM(vocab_size=8, seq_len=6)
    tokens = torch.arange(400) % 8
    splits = SimpleNamespace(train=tokens[:300], val=tokens[300:], test=tokens[:0])
    history = tr.train_lm(model, splits, steps=40, batch_size=4, lr=0.1, eval_every=20, progress=False)
    assert [e["step"] for e in history.evals] == [0, 20, 40]
    assert history.final("val_loss") < 0.5 * history.evals[0]["val_loss"]
    again = tr.train_lm(ToyLM(vocab_size=8, seq_len=6), splits, steps=3, batch_size=4, progress=False)
    assert again.evals[-1]["step"] == 3


def test_train_classifier_wrapper():
    pytest.importorskip("lablib.data")
    x, y = next(classification_stream(seed=5, batch_size=200))
    ds = SimpleNamespace(x_train=x[:150], y_train=y[:150], x_val=x[150:], y_val=y[150:], num_classes=3, name="toy")
    history = tr.train_classifier(tiny_classifier(), ds, steps=60, batch_size=32, lr=1e-2, eval_every=30,
                                  progress=False)
    assert [e["step"] for e in history.evals] == [0, 30, 60]
    assert history.final("val_accuracy") > 0.8


def test_wrapper_bad_inputs_without_data_layer():
    with pytest.raises(ValueError, match="seq_len"):
        tr.train_lm(tiny_classifier(), SimpleNamespace(train=None, val=None), steps=3)
    with pytest.raises(ValueError, match="batch_size"):
        tr.train_lm(ToyLM(), SimpleNamespace(train=None, val=None), steps=3, batch_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        tr.train_classifier(tiny_classifier(), SimpleNamespace(x_val=None, y_val=None), steps=3, batch_size=-1)
