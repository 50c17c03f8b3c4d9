"""TinyTransformer, generate and MLPClassifier checked against hand-written references and invariants."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lablib.models import (
    MLP,
    BlocksOutput,
    CausalSelfAttention,
    LMOutput,
    MLPClassifier,
    TinyTransformer,
    TransformerConfig,
    generate,
)

SMALL = TransformerConfig(vocab_size=17, d_model=16, n_layers=2, n_heads=2, seq_len=8)


def small_model(seed: int = 0, **changes) -> TinyTransformer:
    torch.manual_seed(seed)
    config = TransformerConfig(**{**SMALL.to_dict(), **changes})
    return TinyTransformer(config).eval()


def tokens(batch: int, time: int, *, vocab_size: int = SMALL.vocab_size, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, time), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- config


def test_config_defaults_and_ffn_hidden():
    config = TransformerConfig()
    assert (config.vocab_size, config.d_model, config.n_layers, config.n_heads, config.seq_len) == (256, 64, 4, 4, 64)
    assert config.ffn_hidden == 256 and config.d_head == 16
    assert TransformerConfig(d_hidden=100).ffn_hidden == 100


def test_config_round_trips_through_to_dict_and_is_frozen():
    config = TransformerConfig(d_model=32, n_heads=8, tie_embeddings=False, dropout=0.1)
    assert TransformerConfig(**config.to_dict()) == config
    with pytest.raises(AttributeError):
        config.d_model = 8  # type: ignore[misc]
    with pytest.raises(TypeError):
        TransformerConfig(256)  # type: ignore[misc]  # keyword-only


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"d_model": 30, "n_heads": 4}, ValueError, r"d_model \(30\) must be divisible by n_heads \(4\)"),
        ({"n_layers": 0}, ValueError, r"n_layers must be a positive int, got 0"),
        ({"vocab_size": 2.5}, ValueError, r"vocab_size must be a positive int"),
        ({"seq_len": True}, ValueError, r"seq_len must be a positive int"),
        ({"d_hidden": 0}, ValueError, r"d_hidden must be a positive int or None"),
        ({"dropout": 1.0}, ValueError, r"dropout must be a float in \[0, 1\)"),
        ({"tie_embeddings": 1}, TypeError, r"tie_embeddings must be a bool"),
    ],
)
def test_config_rejects_bad_values(kwargs, error, message):
    with pytest.raises(error, match=message):
        TransformerConfig(**kwargs)


# ---------------------------------------------------------------- forward


def test_forward_shapes_and_defaults():
    model = small_model()
    out = model(tokens(3, 5))
    assert isinstance(out, LMOutput)
    assert out.logits.shape == (3, 5, SMALL.vocab_size)
    assert out.loss is None
    assert out.aux_loss.shape == () and out.aux_loss.item() == 0.0
    assert out.layer_outputs == [None, None]
    assert isinstance(model.blocks, nn.ModuleList) and len(model.blocks) == SMALL.n_layers
    assert isinstance(model.blocks[0].attn, CausalSelfAttention) and isinstance(model.blocks[0].ffn, MLP)


def test_loss_equals_hand_written_cross_entropy():
    model = small_model()
    idx, targets = tokens(2, 6, seed=1), tokens(2, 6, seed=2)
    out = model(idx, targets)
    log_probs = out.logits.log_softmax(dim=-1)
    manual = -sum(log_probs[b, t, targets[b, t]] for b in range(2) for t in range(6)) / 12
    torch.testing.assert_close(out.loss, manual)


def test_matches_a_naive_reimplementation():
    """Same weights, written out with explicit loops and masks instead of fused kernels."""
    model = small_model(seed=3)
    idx = tokens(2, 7, seed=4)
    cfg = model.config
    x = model.token_embedding.weight[idx] + model.position_embedding.weight[: idx.shape[1]]
    mask = torch.tril(torch.ones(7, 7, dtype=torch.bool))
    for block in model.blocks:
        h = block.attn_norm(x)
        q, k, v = (h @ w.T + b for w, b in zip(block.attn.qkv.weight.chunk(3), block.attn.qkv.bias.chunk(3)))
        heads = []
        for head in range(cfg.n_heads):
            cols = slice(head * cfg.d_head, (head + 1) * cfg.d_head)
            scores = q[..., cols] @ k[..., cols].transpose(-1, -2) / math.sqrt(cfg.d_head)
            weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            heads.append(weights @ v[..., cols])
        x = x + torch.cat(heads, dim=-1) @ block.attn.proj.weight.T + block.attn.proj.bias
        h = block.ffn_norm(x)
        x = x + torch.nn.functional.gelu(h @ block.ffn.fc.weight.T + block.ffn.fc.bias) @ block.ffn.proj.weight.T
        x = x + block.ffn.proj.bias
    logits = model.final_norm(x) @ model.token_embedding.weight.T
    torch.testing.assert_close(model(idx).logits, logits, rtol=1e-4, atol=1e-5)


CAUSAL_MODEL = small_model(seed=6)


@given(
    position=st.integers(min_value=0, max_value=SMALL.seq_len - 2),
    new_token=st.integers(min_value=0, max_value=SMALL.vocab_size - 1),
)
@settings(max_examples=25, deadline=None)
def test_causality_later_tokens_do_not_change_earlier_logits(position, new_token):
    model = CAUSAL_MODEL
    idx = tokens(1, SMALL.seq_len, seed=5)
    changed = idx.clone()
    changed[0, position + 1] = new_token
    with torch.no_grad():
        before, after = model(idx).logits, model(changed).logits
    torch.testing.assert_close(before[:, : position + 1], after[:, : position + 1], rtol=0, atol=1e-6)


def test_changing_a_token_does_change_later_logits():
    """The causality test above is not vacuous: information does flow forwards."""
    model = small_model()
    idx = tokens(1, 6, seed=7)
    changed = idx.clone()
    changed[0, 2] = (idx[0, 2] + 1) % SMALL.vocab_size
    with torch.no_grad():
        assert not torch.allclose(model(idx).logits[:, 3:], model(changed).logits[:, 3:])


# ---------------------------------------------------------------- plug-ins


@dataclass
class FakeMoEOutput:
    y: torch.Tensor
    aux_loss: torch.Tensor
    layer_idx: int


class FakeMoE(nn.Module):
    """An FFN plug-in that returns an object, with an aux loss of (layer_idx + 1) * 0.5."""

    def __init__(self, layer_idx: int, config: TransformerConfig) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.mlp = MLP(config)

    def forward(self, x):
        return FakeMoEOutput(y=self.mlp(x), aux_loss=torch.tensor((self.layer_idx + 1) * 0.5), layer_idx=self.layer_idx)


def test_aux_losses_are_summed_and_raw_outputs_returned():
    torch.manual_seed(0)
    model = TinyTransformer(TransformerConfig(**{**SMALL.to_dict(), "n_layers": 3}), ffn_factory=FakeMoE)
    idx = tokens(2, 4)
    out = model(idx, idx)
    torch.testing.assert_close(out.aux_loss, torch.tensor(0.5 + 1.0 + 1.5))
    assert [o.layer_idx for o in out.layer_outputs] == [0, 1, 2]
    assert all(isinstance(o, FakeMoEOutput) for o in out.layer_outputs)
    # the LM loss is the cross-entropy alone; callers add aux_loss themselves
    manual = torch.nn.functional.cross_entropy(out.logits.reshape(-1, SMALL.vocab_size), idx.reshape(-1))
    torch.testing.assert_close(out.loss, manual)


def test_object_without_aux_loss_is_accepted():
    @dataclass
    class OnlyY:
        y: torch.Tensor

    model = TinyTransformer(SMALL, ffn_factory=lambda i, c: _Wrap(MLP(c), OnlyY))
    out = model(tokens(1, 3))
    assert out.aux_loss.item() == 0.0 and isinstance(out.layer_outputs[0], OnlyY)


class _Wrap(nn.Module):
    def __init__(self, inner: nn.Module, wrap) -> None:
        super().__init__()
        self.inner, self.wrap = inner, wrap

    def forward(self, x):
        return self.wrap(self.inner(x))


def test_factories_are_called_with_each_layer_index_in_order():
    calls: list[tuple[str, int, TransformerConfig]] = []

    def attn_factory(layer_idx, config):
        calls.append(("attn", layer_idx, config))
        return CausalSelfAttention(config)

    def ffn_factory(layer_idx, config):
        calls.append(("ffn", layer_idx, config))
        return MLP(config)

    config = TransformerConfig(**{**SMALL.to_dict(), "n_layers": 3})
    TinyTransformer(config, attn_factory=attn_factory, ffn_factory=ffn_factory)
    assert [(kind, i) for kind, i, _ in calls] == [(k, i) for i in range(3) for k in ("attn", "ffn")]
    assert all(c is config for _, _, c in calls)


def test_plugged_attention_is_used():
    class ZeroAttention(nn.Module):
        def forward(self, x):
            return torch.zeros_like(x)

    model = TinyTransformer(SMALL, attn_factory=lambda i, c: ZeroAttention())
    idx = tokens(1, 5)
    changed = idx.clone()
    changed[0, 0] = (idx[0, 0] + 1) % SMALL.vocab_size
    # with no attention, each position sees only its own token: changing token 0 leaves positions 1.. alone
    with torch.no_grad():
        torch.testing.assert_close(model(idx).logits[:, 1:], model(changed).logits[:, 1:])


def test_plugin_init_weights_hook_runs_after_generic_init():
    class ZeroInit(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.router = nn.Linear(config.d_model, config.d_model)

        def init_weights(self):
            nn.init.zeros_(self.router.weight)

        def forward(self, x):
            return self.router(x)

    model = TinyTransformer(SMALL, ffn_factory=lambda i, c: ZeroInit(c))
    assert all(torch.count_nonzero(b.ffn.router.weight) == 0 for b in model.blocks)


def test_run_blocks_can_be_overridden_to_loop_the_same_blocks():
    class Looped(TinyTransformer):
        def _run_blocks(self, x):
            aux, outputs = x.new_zeros(()), []
            for _ in range(2):
                for block in self.blocks:
                    out = block(x)
                    x, aux = out.x, aux + out.aux_loss
                    outputs.append(out.ffn_output)
            return BlocksOutput(x=x, aux_loss=aux, layer_outputs=outputs)

    torch.manual_seed(0)
    looped = Looped(SMALL)
    torch.manual_seed(0)
    plain = TinyTransformer(SMALL)
    idx = tokens(1, 4)
    assert len(looped(idx).layer_outputs) == 2 * SMALL.n_layers
    assert not torch.allclose(looped(idx).logits, plain(idx).logits)


def test_plugin_with_wrong_output_shape_is_named():
    model = TinyTransformer(SMALL, ffn_factory=lambda i, c: nn.Linear(c.d_model, 3))
    with pytest.raises(ValueError, match=r"ffn module must return y of shape \(1, 4, 16\).*got \(1, 4, 3\)"):
        model(tokens(1, 4))


def test_plugin_with_non_scalar_aux_loss_is_named():
    model = TinyTransformer(
        SMALL, ffn_factory=lambda i, c: _Wrap(nn.Identity(), lambda y: FakeMoEOutput(y, torch.ones(2), 0))
    )
    with pytest.raises(ValueError, match=r"aux_loss as a scalar"):
        model(tokens(1, 4))


def test_factory_must_return_a_module():
    with pytest.raises(TypeError, match=r"ffn_factory\(0, config\) must return an nn.Module, got function"):
        TinyTransformer(SMALL, ffn_factory=lambda i, c: (lambda x: x))


# ---------------------------------------------------------------- weights


def test_tied_embeddings_share_one_tensor():
    tied, untied = small_model(), small_model(tie_embeddings=False)
    assert tied.lm_head.weight is tied.token_embedding.weight
    assert untied.lm_head.weight is not untied.token_embedding.weight
    n_tied = sum(p.numel() for p in tied.parameters())
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_untied - n_tied == SMALL.vocab_size * SMALL.d_model


def test_same_seed_same_model_different_seed_different_model():
    a, b, c = small_model(seed=0), small_model(seed=0), small_model(seed=1)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.blocks[0].attn.qkv.weight, c.blocks[0].attn.qkv.weight)


def test_nanogpt_initialisation():
    torch.manual_seed(0)
    model = TinyTransformer(TransformerConfig(d_model=128, n_layers=8, n_heads=4))
    residual_std = 0.02 / math.sqrt(2 * 8)
    for name, param in model.named_parameters():
        if name.endswith("proj.weight"):
            assert param.std().item() == pytest.approx(residual_std, rel=0.1), name
        elif name.endswith(("qkv.weight", "fc.weight", "embedding.weight")):
            assert param.std().item() == pytest.approx(0.02, rel=0.1), name
        elif name.endswith("bias"):
            assert torch.count_nonzero(param) == 0, name
        elif "norm" in name:
            assert torch.all(param == 1), name


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "idx, error, message",
    [
        (torch.zeros(4, dtype=torch.long), ValueError, r"idx must have shape \(batch, time\), got shape \(4,\)"),
        (torch.zeros(1, 4), TypeError, r"idx must be int64 .* got dtype torch.float32"),
        (torch.full((1, 4), SMALL.vocab_size), ValueError, r"idx values must be token ids in \[0, 17\), got min 17"),
        (torch.full((1, 4), -1), ValueError, r"idx values must be token ids in \[0, 17\), got min -1"),
        (torch.zeros(1, SMALL.seq_len + 1, dtype=torch.long), ValueError, r"length 9 but the model's seq_len is 8"),
        (torch.zeros(1, 0, dtype=torch.long), ValueError, r"length 0"),
        ([[1, 2]], TypeError, r"idx must be a torch.Tensor, got list"),
    ],
)
def test_bad_idx_is_named(idx, error, message):
    with pytest.raises(error, match=message):
        small_model()(idx)


def test_targets_shape_must_match_idx():
    with pytest.raises(ValueError, match=r"targets must have the shape of idx \(2, 4\), got \(2, 3\)"):
        small_model()(tokens(2, 4), tokens(2, 3))


def test_bad_config_type():
    with pytest.raises(TypeError, match="config must be a TransformerConfig"):
        TinyTransformer({"d_model": 16})  # type: ignore[arg-type]


# ---------------------------------------------------------------- generate


def test_generate_shape_prefix_and_no_mutation():
    model = small_model().train()
    idx = tokens(2, 3)
    before = idx.clone()
    out = generate(model, idx, max_new_tokens=5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 8) and out.dtype == torch.long
    assert torch.equal(out[:, :3], before)
    assert torch.equal(idx, before)
    assert model.training  # mode restored
    assert int(out.min()) >= 0 and int(out.max()) < SMALL.vocab_size


def test_generate_is_deterministic_given_a_generator():
    model = small_model()
    idx = tokens(2, 3)
    runs = [generate(model, idx, max_new_tokens=10, generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_generate_crops_context_to_seq_len():
    model = small_model()
    long = tokens(1, SMALL.seq_len + 5, seed=3)
    out = generate(model, long, max_new_tokens=4, generator=torch.Generator().manual_seed(2))
    cropped = generate(model, long[:, -SMALL.seq_len :], max_new_tokens=4, generator=torch.Generator().manual_seed(2))
    assert out.shape == (1, SMALL.seq_len + 9)
    assert torch.equal(out[:, -4:], cropped[:, -4:])


def test_greedy_and_top_1_pick_the_argmax():
    model = small_model()
    idx = tokens(3, 4)
    expected = model(idx).logits[:, -1].argmax(dim=-1)
    greedy = generate(model, idx, max_new_tokens=1, temperature=0)
    top1 = generate(model, idx, max_new_tokens=1, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy[:, -1], expected) and torch.equal(top1[:, -1], expected)


def test_top_k_only_samples_from_the_k_best():
    model = small_model()
    idx = tokens(1, 4)
    allowed = set(model(idx).logits[0, -1].topk(3).indices.tolist())
    gen = torch.Generator().manual_seed(0)
    picks = {int(generate(model, idx, max_new_tokens=1, top_k=3, generator=gen)[0, -1]) for _ in range(30)}
    assert picks <= allowed


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": -1}, r"max_new_tokens must be an int >= 0"),
        ({"max_new_tokens": 2, "temperature": -0.5}, r"temperature must be a number >= 0"),
        ({"max_new_tokens": 2, "top_k": 0}, r"top_k must be None or an int >= 1"),
    ],
)
def test_generate_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(small_model(), tokens(1, 2), **kwargs)


def test_generate_needs_a_language_model():
    with pytest.raises(TypeError, match=r"generate needs a model with `config.seq_len`"):
        generate(nn.Linear(2, 2), tokens(1, 2), max_new_tokens=1)


def test_generate_bad_idx():
    with pytest.raises(ValueError, match=r"idx must be an int64 tensor of shape \(batch, time\), got shape \(3,\)"):
        generate(small_model(), torch.zeros(3, dtype=torch.long), max_new_tokens=1)


# ---------------------------------------------------------------- MLPClassifier


def test_mlp_classifier_shapes_and_layers():
    torch.manual_seed(0)
    model = MLPClassifier(in_features=10, hidden_sizes=[8, 6], num_classes=3, activation="gelu")
    assert model(torch.randn(5, 10)).shape == (5, 3)
    assert [(l.in_features, l.out_features) for l in model.layers] == [(10, 8), (8, 6), (6, 3)]
    logistic = MLPClassifier(in_features=4, hidden_sizes=[], num_classes=2)
    x = torch.randn(3, 4)
    torch.testing.assert_close(logistic(x), x @ logistic.layers[0].weight.T + logistic.layers[0].bias)


def test_mlp_classifier_matches_hand_written_forward():
    torch.manual_seed(1)
    model = MLPClassifier(in_features=4, hidden_sizes=[5], num_classes=2, activation="tanh")
    x = torch.randn(3, 4)
    first, second = model.layers
    expected = torch.tanh(x @ first.weight.T + first.bias) @ second.weight.T + second.bias
    torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"activation": "swish"}, r"unknown activation 'swish'; choose one of \['gelu', 'relu', 'silu', 'tanh'\]"),
        ({"hidden_sizes": [4, 0]}, r"hidden_sizes\[1\] must be a positive int, got 0"),
        ({"num_classes": 0}, r"num_classes must be a positive int"),
    ],
)
def test_mlp_classifier_bad_arguments(kwargs, message):
    args = {"in_features": 3, "hidden_sizes": [4], "num_classes": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        MLPClassifier(**args)


def test_mlp_classifier_bad_input_shape():
    model = MLPClassifier(in_features=3, hidden_sizes=[4], num_classes=2)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 3\), got \(2, 5\)"):
        model(torch.zeros(2, 5))
