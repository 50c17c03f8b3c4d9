"""lablib.recursive: tied recursive transformer (cycle / sequence), init from vanilla, ledger."""

from __future__ import annotations

import pytest
import torch

from lablib import ledger, models
from lablib.recursive import RecursiveTransformer, block_schedule, recursive_ledger


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def vanilla(n_layers: int = 4, seed: int = 0) -> models.TinyTransformer:
    torch.manual_seed(seed)
    cfg = models.TransformerConfig(vocab_size=16, d_model=8, n_layers=n_layers, n_heads=2, seq_len=8)
    return models.TinyTransformer(cfg)


def test_schedules():
    assert block_schedule(num_unique=2, num_recursion=2, sharing="cycle") == [0, 1, 0, 1]
    assert block_schedule(num_unique=2, num_recursion=2, sharing="sequence") == [0, 0, 1, 1]
    with pytest.raises(ValueError):
        block_schedule(num_unique=2, num_recursion=2, sharing="bogus")


def test_k_equals_depth_is_vanilla():
    v = vanilla().eval()
    r = RecursiveTransformer.from_vanilla(v, num_recursion=1).eval()
    idx = torch.randint(0, 16, (2, 8))
    torch.testing.assert_close(r(idx).logits, v(idx).logits)


@pytest.mark.parametrize("sharing,order", [("cycle", [0, 1, 0, 1]), ("sequence", [0, 0, 1, 1])])
def test_call_order_and_gradients(sharing, order):
    r = RecursiveTransformer.from_vanilla(vanilla(), num_recursion=2, sharing=sharing)
    calls = []
    for k, b in enumerate(r.blocks):
        b.register_forward_hook(lambda m, i, o, k=k: calls.append(k))
    out = r(torch.randint(0, 16, (2, 8)), torch.randint(0, 16, (2, 8)))
    assert calls == order
    out.loss.backward()
    assert all(p.grad is not None for p in r.blocks.parameters())


def test_bad_config():
    with pytest.raises(ValueError):
        RecursiveTransformer.from_vanilla(vanilla(), num_recursion=3)
    with pytest.raises(ValueError):
        RecursiveTransformer.from_vanilla(vanilla(), num_recursion=2, initialization="x")


@pytest.mark.parametrize("sharing", ["cycle", "sequence"])
@pytest.mark.parametrize("init", ["stepwise", "average", "lower"])
def test_initialization_by_hand(sharing, init):
    v = vanilla()
    r = RecursiveTransformer.from_vanilla(v, num_recursion=2, sharing=sharing, initialization=init)
    src = [dict(b.named_parameters()) for b in v.blocks]
    mapped = {"cycle": {0: [0, 2], 1: [1, 3]}, "sequence": {0: [0, 1], 1: [2, 3]}}[sharing]
    for k, blk in enumerate(r.blocks):
        for name, p in blk.named_parameters():
            if init == "lower":
                want = src[k][name]
            elif init == "stepwise":
                want = src[mapped[k][0]][name]
            else:
                want = (src[mapped[k][0]][name] + src[mapped[k][1]][name]) / 2
            torch.testing.assert_close(p, want)
    torch.testing.assert_close(r.token_embedding.weight, v.token_embedding.weight)


def test_ledger_counts_once_flops_per_use():
    v = vanilla()
    r = RecursiveTransformer.from_vanilla(v, num_recursion=2)
    block_params = sum(p.numel() for p in v.blocks[0].parameters())
    lv, lr = ledger.ledger(v), recursive_ledger(r)
    assert lv.total - lr.total == 2 * block_params
    assert lr.flops_per_token == lv.flops_per_token


def test_relaxed_full_rank_is_original_and_rank0_is_recursive():
    from lablib.recursive import RelaxedRecursiveTransformer

    v = vanilla().eval()
    idx = torch.randint(0, 16, (2, 8))
    full = RelaxedRecursiveTransformer.from_vanilla(v, num_recursion=2, rank=10_000).eval()
    torch.testing.assert_close(full(idx).logits, v(idx).logits, atol=1e-5, rtol=1e-4)
    zero = RelaxedRecursiveTransformer.from_vanilla(v, num_recursion=2, rank=0).eval()
    pure = RecursiveTransformer.from_vanilla(v, num_recursion=2).eval()
    torch.testing.assert_close(zero(idx).logits, pure(idx).logits)
    low = RelaxedRecursiveTransformer.from_vanilla(v, num_recursion=2, rank=1)
    assert ledger.ledger(pure).total < ledger.ledger(low).total < ledger.ledger(full).total
    low(idx, idx).loss.backward()
    assert all(p.grad is not None for p in low.lora.parameters())


def test_mod_capacity_exact_tokens_and_identity():
    from lablib.recursive import MixtureOfDepthsTransformer, mod_flops_per_token

    v = vanilla(2).eval()
    torch.manual_seed(1)
    m = MixtureOfDepthsTransformer(v.config, capacity=1.0, gate="none").eval()
    m.load_state_dict(v.state_dict(), strict=False)
    idx = torch.randint(0, 16, (2, 8))
    torch.testing.assert_close(m(idx).logits, v(idx).logits)
    half = MixtureOfDepthsTransformer(v.config, capacity=0.5)
    shapes = []
    for b in half.blocks:
        b.register_forward_hook(lambda mod, i, o: shapes.append(tuple(i[0].shape)))
    half(idx, idx).loss.backward()
    assert shapes == [(2, 4, 8), (2, 4, 8)]
    assert half.routers[0].weight.grad is not None
    assert mod_flops_per_token(half, seq_len=8) < ledger.ledger(half, seq_len=8).flops_per_token
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError):
            MixtureOfDepthsTransformer(v.config, capacity=bad)
