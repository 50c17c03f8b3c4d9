"""The parameter ledger checked against hand-written architecture formulas and toy modules counted by hand."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from lablib.intrinsic import SubspaceModel
from lablib.ledger import (
    LedgerCounts,
    ParamLedger,
    format_ledger,
    ledger,
    transformer_flops_formula,
    transformer_param_formula,
)
from lablib.models import MLP, MLPClassifier, TinyTransformer, TransformerConfig

CONFIGS = [
    TransformerConfig(vocab_size=17, d_model=16, n_layers=2, n_heads=2, seq_len=8),
    TransformerConfig(vocab_size=17, d_model=16, n_layers=2, n_heads=2, seq_len=8, tie_embeddings=False),
    TransformerConfig(vocab_size=31, d_model=24, n_layers=3, n_heads=3, seq_len=5, d_hidden=40),
    TransformerConfig(vocab_size=31, d_model=24, n_layers=1, n_heads=4, seq_len=12, d_hidden=7, tie_embeddings=False),
    TransformerConfig(),
]


def config_id(config: TransformerConfig) -> str:
    tied = "tied" if config.tie_embeddings else "untied"
    return f"V{config.vocab_size}-d{config.d_model}-L{config.n_layers}-h{config.ffn_hidden}-{tied}"


# ---------------------------------------------------------------- dense transformer vs the analytic formulas


def test_formula_by_hand_for_the_default_config():
    # V=256, d=64, T=64, L=4, h=256, tied:
    # 256*64 + 64*64 + 4 * (4*64 + 4*64*64 + 4*64 + 2*64*256 + 256 + 64) + 2*64
    assert transformer_param_formula(TransformerConfig()) == 16384 + 4096 + 4 * (256 + 16640 + 33088) + 128
    # 2 * (4 * (4*64*64 + 2*64*256) + 256*64) + 4 * 4 * 64 * 64
    assert transformer_flops_formula(TransformerConfig()) == 2 * (4 * (16384 + 32768) + 16384) + 65536


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_param_formula_matches_torch_and_the_ledger(config):
    model = TinyTransformer(config)
    expected = transformer_param_formula(config)
    assert sum(p.numel() for p in model.parameters()) == expected
    row = ledger(model)
    # a dense model with no buffers and nothing frozen: all four counts agree
    assert row.total == row.active_per_token == row.stored == row.trainable == expected


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_flops_formula_matches_the_ledger(config):
    model = TinyTransformer(config)
    assert ledger(model).flops_per_token == transformer_flops_formula(config)
    assert ledger(model, seq_len=3).flops_per_token == transformer_flops_formula(config, seq_len=3)


def test_tying_saves_parameters_but_not_flops():
    tied, untied = CONFIGS[0], CONFIGS[1]
    a, b = ledger(TinyTransformer(tied)), ledger(TinyTransformer(untied))
    assert b.total - a.total == tied.vocab_size * tied.d_model
    assert a.flops_per_token == b.flops_per_token


def test_attention_term_grows_linearly_with_context():
    model = TinyTransformer(CONFIGS[0])
    short, long = ledger(model, seq_len=10), ledger(model, seq_len=11)
    assert long.flops_per_token - short.flops_per_token == 2 * 2 * CONFIGS[0].n_layers * CONFIGS[0].d_model


# ---------------------------------------------------------------- generic rules on small modules


def test_mlp_classifier_flops_are_twice_the_weight_matrices():
    model = MLPClassifier(in_features=10, hidden_sizes=[8, 6], num_classes=3)
    row = ledger(model, name="mlp")
    weights = 10 * 8 + 8 * 6 + 6 * 3
    biases = 8 + 6 + 3
    assert row.name == "mlp"
    assert row.total == row.active_per_token == row.stored == row.trainable == weights + biases
    assert row.flops_per_token == 2 * weights


def test_frozen_parameters_count_in_total_and_stored_not_trainable():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model[0].requires_grad_(False)
    row = ledger(model)
    assert row.total == row.stored == (4 * 3 + 3) + (3 * 2 + 2)
    assert row.trainable == 3 * 2 + 2


def test_persistent_buffers_count_in_stored_only():
    model = nn.Linear(4, 3)
    model.register_buffer("running_mean", torch.zeros(5))
    model.register_buffer("scratch", torch.zeros(100), persistent=False)
    row = ledger(model)
    assert row.total == 4 * 3 + 3
    assert row.stored == 4 * 3 + 3 + 5


def test_a_module_reused_twice_counts_its_parameters_once_and_its_flops_twice():
    layer = nn.Linear(6, 6)
    model = nn.Sequential(layer, nn.ReLU(), layer)
    row = ledger(model)
    assert row.total == row.active_per_token == 6 * 6 + 6
    assert row.flops_per_token == 2 * (2 * 6 * 6)


def test_a_tensor_shared_between_two_modules_counts_once():
    first, second = nn.Linear(5, 5, bias=False), nn.Linear(5, 5, bias=False)
    second.weight = first.weight
    row = ledger(nn.Sequential(first, second))
    assert row.total == 25
    assert row.flops_per_token == 2 * 50


def test_parameters_registered_directly_on_a_module_count():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(7))

    row = ledger(Scale())
    assert row.total == 7 and row.flops_per_token == 0


# ---------------------------------------------------------------- the ledger_counts extension protocol


class ToyMoE(nn.Module):
    """8 experts (d -> d linear maps) and a router; each token goes to 2 experts."""

    def __init__(self, d_model: int, n_experts: int = 8, top_k: int = 2) -> None:
        super().__init__()
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(nn.Linear(d_model, d_model, bias=False) for _ in range(n_experts))
        self.top_k = top_k

    def forward(self, x):
        gates = self.router(x).softmax(dim=-1)
        weights, chosen = gates.topk(self.top_k, dim=-1)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            y = y + (weights * (chosen == e)).sum(dim=-1, keepdim=True) * expert(x)
        return y

    def ledger_counts(self) -> LedgerCounts:
        router = self.router.weight.numel()
        expert = self.experts[0].weight.numel()
        return LedgerCounts(
            total=router + len(self.experts) * expert,
            active_per_token=router + self.top_k * expert,
            stored=router + len(self.experts) * expert,
            flops_per_token=2 * (router + self.top_k * expert),
        )


def test_self_accounting_module_replaces_the_count_of_its_children():
    config = CONFIGS[0]
    d, L = config.d_model, config.n_layers
    model = TinyTransformer(config, ffn_factory=lambda i, c: ToyMoE(c.d_model))
    row = ledger(model)
    dense_mlp = 2 * d * config.ffn_hidden + config.ffn_hidden + d
    router, expert = d * 8, d * d
    outside = transformer_param_formula(config) - L * dense_mlp
    # every expert counted exactly once: the generic walk skipped the ToyMoE children
    assert row.total == outside + L * (router + 8 * expert) == sum(p.numel() for p in model.parameters())
    assert row.active_per_token == outside + L * (router + 2 * expert)
    assert row.active_per_token < row.total
    assert row.stored == row.total
    assert row.trainable == row.total  # trainable=None: the ledger counts the subtree's requires_grad parameters
    dense_mlp_flops = 2 * L * 2 * d * config.ffn_hidden
    assert row.flops_per_token == transformer_flops_formula(config) - dense_mlp_flops + L * 2 * (router + 2 * expert)
    assert "blocks.0.ffn: ToyMoE" in row.notes


def test_the_modules_own_numbers_are_used_verbatim():
    class Claims(nn.Module):
        def __init__(self):
            super().__init__()
            self.big = nn.Linear(100, 100)  # ignored: the module speaks for itself

        def ledger_counts(self):
            return LedgerCounts(total=11, active_per_token=3, stored=2, flops_per_token=5, trainable=1)

    model = nn.Sequential(nn.Linear(2, 2), Claims())
    row = ledger(model)
    assert (row.total, row.active_per_token, row.stored, row.trainable, row.flops_per_token) == (
        6 + 11,
        6 + 3,
        6 + 2,
        6 + 1,
        2 * 4 + 5,
    )


def test_a_tensor_shared_with_a_self_accounting_module_is_counted_by_it_only():
    moe = ToyMoE(4)
    outside = nn.Linear(4, 4, bias=False)
    outside.weight = moe.experts[0].weight  # the rest of the model reuses one expert
    row = ledger(nn.Sequential(moe, outside))
    assert row.total == moe.ledger_counts().total == sum(p.numel() for p in moe.parameters())
    # but the outside matmul is still performed
    assert row.flops_per_token == moe.ledger_counts().flops_per_token + 2 * 16


def test_a_self_accounting_module_reused_counts_params_once_and_flops_per_use():
    moe = ToyMoE(4, n_experts=8, top_k=2)
    counts = moe.ledger_counts()
    twice = ledger(nn.Sequential(moe, moe))
    assert twice.total == counts.total
    assert twice.flops_per_token == 2 * counts.flops_per_token
    assert twice.active_per_token == 2 * counts.active_per_token
    # active is capped at what exists: 8 uses of 2 experts cannot touch more than 8 experts
    eight = ledger(nn.Sequential(*[moe] * 8))
    assert eight.active_per_token == counts.total
    assert "x8" in eight.notes


def test_distinct_self_accounting_modules_sharing_tensors_warn():
    a, b = ToyMoE(4), ToyMoE(4)
    b.router = a.router
    with pytest.warns(UserWarning, match="both define ledger_counts and share tensors"):
        ledger(nn.Sequential(a, b))


def test_root_module_can_account_for_itself_like_the_subspace_model():
    base = MLPClassifier(in_features=5, hidden_sizes=[7], num_classes=3)
    row = ledger(SubspaceModel(base, dim=4))
    assert row.total == row.active_per_token == 5 * 7 + 7 + 7 * 3 + 3
    assert row.stored == row.trainable == 4
    assert row.flops_per_token == 2 * (5 * 7 + 7 * 3)


def test_ledger_counts_must_return_the_four_counts():
    class Broken(nn.Module):
        def ledger_counts(self):
            return {"total": 3}

    with pytest.raises(TypeError, match=r"ledger_counts\(\) returned dict without `total`"):
        ledger(nn.Sequential(Broken()))


def test_ledger_counts_values_must_be_non_negative_ints():
    class Negative(nn.Module):
        def ledger_counts(self):
            return LedgerCounts(total=-1, active_per_token=0, stored=0, flops_per_token=0)

    with pytest.raises(ValueError, match=r"ledger_counts\(\)\.total must be a non-negative int, got -1"):
        ledger(Negative())


# ---------------------------------------------------------------- rows and tables


def test_as_row_is_a_plain_dict():
    row = ledger(MLPClassifier(in_features=3, hidden_sizes=[], num_classes=2), name="logistic")
    assert row.as_row() == {
        "name": "logistic",
        "total": 8,
        "active_per_token": 8,
        "stored": 8,
        "trainable": 8,
        "flops_per_token": 12,
        "notes": "",
    }


def test_format_ledger_is_an_aligned_table_with_thousands_separators():
    rows = [
        ParamLedger("dense", 1_234_567, 1_234_567, 1_234_567, 1_234_567, 2_000_000),
        ParamLedger("moe", 12, 3, 12, 12, 6, notes="2 of 8 experts"),
    ]
    text = format_ledger(rows)
    lines = text.splitlines()
    assert len(lines) == 4
    assert lines[0].split() == ["model", "total", "active/token", "stored", "trainable", "FLOPs/token", "notes"]
    assert set(lines[1]) <= {"-", " "}
    assert "1,234,567" in lines[2] and "2,000,000" in lines[2]
    assert lines[3].endswith("2 of 8 experts")
    # numbers are right-aligned: each number column ends at the same place on every line
    ends = [m.end() for m in re.finditer(r"\S+", lines[2])][1:6]
    assert ends == [m.end() for m in re.finditer(r"\S+", lines[3])][1:6]
    assert str(rows[0]) == format_ledger(rows[:1])


def test_format_ledger_rejects_other_rows():
    with pytest.raises(TypeError, match="row 0 is a dict"):
        format_ledger([{"name": "x"}])


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"seq_len": 0}, ValueError, r"seq_len must be a positive int or None, got 0"),
        ({"seq_len": 2.0}, ValueError, r"seq_len must be a positive int"),
    ],
)
def test_ledger_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        ledger(nn.Linear(2, 2), **kwargs)


def test_ledger_needs_a_module():
    with pytest.raises(TypeError, match=r"ledger\(\) takes an nn.Module, got dict"):
        ledger({"w": torch.zeros(3)})


def test_ledger_does_not_change_the_model():
    model = TinyTransformer(CONFIGS[0], ffn_factory=lambda i, c: MLP(c))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ledger(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("tie", [True, False])
def test_param_breakdown_matches_the_modules_component_by_component(tie):
    from lablib.ledger import transformer_param_breakdown

    config = TransformerConfig(vocab_size=50, d_model=16, n_layers=3, n_heads=2, seq_len=12, tie_embeddings=tie)
    model = TinyTransformer(config)
    numel = lambda modules: sum(p.numel() for m in modules for p in m.parameters())  # noqa: E731
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    expected = {
        "embeddings": numel([model.token_embedding, model.position_embedding]),
        "attention": numel([b.attn for b in model.blocks]),
        "mlp": numel([b.ffn for b in model.blocks]),
        "layer_norms": numel(norms),
        "lm_head": 0 if tie else model.lm_head.weight.numel(),
    }
    assert transformer_param_breakdown(config) == expected
