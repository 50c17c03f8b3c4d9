"""`lablib.adapters`: adapters on the Linear layers of any model, from plain LoRA to adapters built from shared banks.

Attach by name pattern as PEFT users expect (a config per kind with `r`, `alpha`, `dropout`, `target_modules`,
`exclude_modules`), train only the adapter, merge it into the base weight and back, save only the adapter, and count
it with `lablib.ledger`. Details of the contract (matching rules, what mutates, merging, the ledger rules) are in
`lablib.adapters.core`.

| kind | config | the update of one (out × in) layer | shared across layers |
|---|---|---|---|
| LoRA ([Hu et al. 2022](https://arxiv.org/abs/2106.09685)) | `LoraConfig` | (α/r) B A | nothing |
| NOLA ([Koohpayegani et al. 2024](https://arxiv.org/abs/2310.02556)) | `NolaConfig` | (α/r) (Σ β_j B_j)(Σ α_i A_i), bases from a seed | nothing (bases are seeded, stored 0) |
| VB-LoRA ([Li et al. 2024](https://arxiv.org/abs/2405.15179)) | `VBLoraConfig` | B A, each length-b sub-vector a top-k mix of bank vectors | one vector bank |
| MoS ([Wang et al. 2025](https://arxiv.org/abs/2410.00938)) | `MosConfig` | (α/r) B A, rank vectors concatenated from routed shards | shard pools per module type |
| Compacter-style ([Karimi Mahabadi et al. 2021](https://arxiv.org/abs/2106.04647)) | `CompacterConfig` | (α/r) Σ_i S_i ⊗ (U_i V_iᵀ) | the slow factors S_i |

* `core`: `attach_adapters` (a copy) / `attach_adapters_` (in place) -> `AdaptedModel`; `merge_adapters_`,
  `unmerge_adapters_`, `merge_and_unload`; `adapter_state_dict`, `load_adapter_state_dict_`; `adapter_ledger`,
  `bank_usage`; `match_modules` (PEFT's target rules).
* `lora`, `nola`, `vblora`, `mos`, `compacter`: one module per kind, each documenting its equations, defaults and
  deviations from the papers' code.

```python
from lablib import adapters, ledger, train
adapted = adapters.attach_adapters(model, adapters.LoraConfig(r=4, alpha=8, target_modules=["qkv", "attn.proj"]))
history = train.train_lm(adapted, splits, steps=200)        # only adapter parameters train
print(ledger.format_ledger([adapters.adapter_ledger(adapted), ledger.ledger(adapted)]))
adapters.merge_adapters_(adapted)                            # W <- W0 + ΔW; unmerge_adapters_ undoes it
state = adapters.adapter_state_dict(adapted)                 # adapter tensors (+ seeds) only
```
"""

from __future__ import annotations

from lablib.adapters.compacter import RULE_KEY, CompacterConfig, CompacterLinear, PHMRule, kron_sum
from lablib.adapters.core import (
    CONFIG_KINDS,
    AdaptedModel,
    AdapterBuild,
    AdapterConfig,
    AdapterLinear,
    BankUsage,
    adapted_layers,
    adapter_ledger,
    adapter_state_dict,
    attach_adapters,
    attach_adapters_,
    bank_usage,
    config_from_dict,
    derive_seed,
    load_adapter_state_dict_,
    match_modules,
    merge_adapters_,
    merge_and_unload,
    unmerge_adapters_,
)
from lablib.adapters.lora import LoraConfig, LoraLinear
from lablib.adapters.mos import MosConfig, MosLinear, MosPool, MosRouting, module_type, mos_routing
from lablib.adapters.nola import NolaConfig, NolaLinear, nola_bases
from lablib.adapters.vblora import BANK_KEY, VBLoraConfig, VBLoraLinear, VectorBank, topk_compose

__all__ = [
    "BANK_KEY",
    "CONFIG_KINDS",
    "RULE_KEY",
    "AdaptedModel",
    "AdapterBuild",
    "AdapterConfig",
    "AdapterLinear",
    "BankUsage",
    "CompacterConfig",
    "CompacterLinear",
    "LoraConfig",
    "LoraLinear",
    "MosConfig",
    "MosLinear",
    "MosPool",
    "MosRouting",
    "NolaConfig",
    "NolaLinear",
    "PHMRule",
    "VBLoraConfig",
    "VBLoraLinear",
    "VectorBank",
    "adapted_layers",
    "adapter_ledger",
    "adapter_state_dict",
    "attach_adapters",
    "attach_adapters_",
    "bank_usage",
    "config_from_dict",
    "derive_seed",
    "kron_sum",
    "load_adapter_state_dict_",
    "match_modules",
    "merge_adapters_",
    "merge_and_unload",
    "module_type",
    "mos_routing",
    "nola_bases",
    "topk_compose",
    "unmerge_adapters_",
]
