"""`lablib.moe`: mixture-of-experts routers, the MoE FFN layer and load balancing.

* `routers`: one interface, `router(x_flat) -> RouterOutput(weights, indices, logits, probs, ...)`, seven routers
  (softmax top-k with optional noise, Switch top-1, expert choice, cosine, hash, random-fixed, RMoE's recurrent one).
* `layer`: `MoELayer` (stacked expert weights, grouped dispatch, capacity and dropping, shared and fine-grained
  experts, `MoEOutput` diagnostics, `ledger_counts`), `moe_ffn_factory` for `TinyTransformer`, and
  `MoETransformer`, which hands the layers token ids and the recurrent router state.
* `balance`: the Switch/GShard load-balancing loss, the ST-MoE router z-loss and auxiliary-loss-free balancing.

Papers: Shazeer et al. 2017 (noisy top-k, [arXiv:1701.06538](https://arxiv.org/abs/1701.06538)); GShard
([arXiv:2006.16668](https://arxiv.org/abs/2006.16668)); Switch Transformers
([arXiv:2101.03961](https://arxiv.org/abs/2101.03961)); ST-MoE ([arXiv:2202.08906](https://arxiv.org/abs/2202.08906));
Expert Choice ([arXiv:2202.09368](https://arxiv.org/abs/2202.09368)); Hash Layers
([arXiv:2106.04426](https://arxiv.org/abs/2106.04426)); DeepSeekMoE
([arXiv:2401.06066](https://arxiv.org/abs/2401.06066)); RMoE ([arXiv:2408.06793](https://arxiv.org/abs/2408.06793));
auxiliary-loss-free balancing ([arXiv:2408.15664](https://arxiv.org/abs/2408.15664)) and DeepSeek-V3
([arXiv:2412.19437](https://arxiv.org/abs/2412.19437));
Ternovtsii & Bilak, *Equifinality in Mixture of Experts: Routing Topology Does Not Determine Language Modeling
Quality* (cosine, hash and random-fixed routing compared).

```python
from lablib import models, moe
config = models.TransformerConfig(vocab_size=256, d_model=64, n_layers=4, n_heads=4, seq_len=64)
model = models.TinyTransformer(config, ffn_factory=moe.moe_ffn_factory(num_experts=8, top_k=2))
out = model(idx, targets)          # out.aux_loss: the balance losses; out.layer_outputs[i]: MoEOutput
```
"""

from __future__ import annotations

from lablib.moe.balance import ExpertBias, load_balancing_loss, load_imbalance, router_entropy, router_z_loss
from lablib.moe.layer import (
    EXPERT_ACTIVATIONS,
    EXPERT_BACKENDS,
    Experts,
    MoELayer,
    MoEOutput,
    MoETransformer,
    capacity_mask,
    grouped_torch_experts,
    lm_loss_with_bias_update,
    moe_ffn_factory,
    register_expert_backend,
    token_choice_capacity,
    update_expert_biases,
)
from lablib.moe.routers import (
    EXPERT_CHOICE,
    ROUTERS,
    TOKEN_CHOICE,
    CosineRouter,
    ExpertChoiceRouter,
    HashRouter,
    RandomFixedRouter,
    RecurrentRouter,
    Router,
    RouterOutput,
    SwitchRouter,
    TopKRouter,
    build_router,
    expert_choice_capacity,
    router_options,
    top_k_gating,
)

__all__ = [
    # routers
    "TOKEN_CHOICE",
    "EXPERT_CHOICE",
    "ROUTERS",
    "Router",
    "RouterOutput",
    "TopKRouter",
    "SwitchRouter",
    "ExpertChoiceRouter",
    "CosineRouter",
    "HashRouter",
    "RandomFixedRouter",
    "RecurrentRouter",
    "build_router",
    "router_options",
    "top_k_gating",
    "expert_choice_capacity",
    # layer
    "EXPERT_ACTIVATIONS",
    "EXPERT_BACKENDS",
    "register_expert_backend",
    "grouped_torch_experts",
    "Experts",
    "MoELayer",
    "MoEOutput",
    "MoETransformer",
    "moe_ffn_factory",
    "capacity_mask",
    "token_choice_capacity",
    "update_expert_biases",
    "lm_loss_with_bias_update",
    # balance
    "ExpertBias",
    "load_balancing_loss",
    "router_z_loss",
    "router_entropy",
    "load_imbalance",
]
