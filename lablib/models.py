"""A tiny, pluggable GPT and a plain MLP classifier: the dense baselines every lab measures itself against.

`TinyTransformer` is a decoder-only, pre-LayerNorm transformer in the style of GPT-2
([Radford et al. 2019](https://cdn.openai.com/better-language-models/language_models_are_unsupervised_multitask_learners.pdf))
as written plainly in Karpathy's [nanoGPT](https://github.com/karpathy/nanoGPT):

    x_0     = E_tok[idx] + E_pos[0..T)
    x_{l+½} = x_l     + Attn_l(LN(x_l))          (causal self-attention)
    x_{l+1} = x_{l+½} + FFN_l(LN(x_{l+½}))
    logits  = LN(x_L) W_headᵀ                      (W_head = E_tok when the embeddings are tied)

Every block's attention and FFN come from *factories* `factory(layer_idx, config) -> nn.Module`, so later labs swap
in a mixture-of-experts FFN, a shared expert pool or a low-rank adapter without touching this file. A plugged module
takes `x` of shape (B, T, d_model) and returns either a tensor of the same shape or an object with attribute `y`
(that tensor) and, optionally, `aux_loss` (a scalar tensor, e.g. a load-balancing loss); the model sums the aux
losses and hands the FFNs' raw outputs back in `LMOutput.layer_outputs` for diagnostics.

The loop over blocks is one small method, `TinyTransformer._run_blocks`, so recursive transformers can override it
(loop the same blocks several times) while `blocks` stays a plain `nn.ModuleList`. Two small hooks let a subclass feed
its FFNs more than x: `_block_context(idx)` returns extra keywords for `_run_blocks` (none by default), and
`Block.forward(x, **ffn_kwargs)` hands keywords to the FFN (`lablib.moe.MoETransformer` passes token ids and the
recurrent router state this way).

Initialisation follows nanoGPT: every `nn.Linear` / `nn.Embedding` weight ~ N(0, 0.02²), biases 0, LayerNorm
(1, 0), and the output projection of each residual branch (any parameter named `*.proj.weight`) ~ N(0, (0.02 /
sqrt(2 n_layers))²), because each of the 2 n_layers residual branches adds its variance to the stream. A plugged
module that needs its own initialisation (a zero-init router, LoRA's B = 0) defines `init_weights()`; it is called
after the generic initialisation. Everything draws from torch's global RNG, so `torch.manual_seed` makes a model
reproducible.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

ModuleFactory = Callable[[int, "TransformerConfig"], nn.Module]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
}

INIT_STD = 0.02


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, kw_only=True)
class TransformerConfig:
    """Hyper-parameters of `TinyTransformer`. `d_hidden=None` means the usual 4 * d_model (see `ffn_hidden`)."""

    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    seq_len: int = 64
    d_hidden: int | None = None
    dropout: float = 0.0
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "seq_len"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.d_hidden is not None and (not _is_int(self.d_hidden) or self.d_hidden < 1):
            raise ValueError(f"d_hidden must be a positive int or None (-> 4 * d_model), got {self.d_hidden!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}) to split into equal heads"
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be a float in [0, 1), got {self.dropout!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise TypeError(f"tie_embeddings must be a bool, got {self.tie_embeddings!r}")

    @property
    def ffn_hidden(self) -> int:
        """Width of the FFN's hidden layer: `d_hidden`, or 4 * d_model when it is None."""
        return 4 * self.d_model if self.d_hidden is None else self.d_hidden

    @property
    def d_head(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        """The constructor arguments as a plain dict (`TransformerConfig(**c.to_dict()) == c`)."""
        return asdict(self)


@dataclass
class LMOutput:
    """What `TinyTransformer.forward` returns.

    * `logits`: (B, T, vocab_size), next-token scores at every position.
    * `loss`: mean cross-entropy against `targets`, or None when no targets were given (aux_loss not included).
    * `aux_loss`: sum of the plugged modules' auxiliary losses (a 0-d tensor, 0. when there are none).
    * `layer_outputs`: per block, the raw object its FFN returned when that was not a plain tensor, else None.
    """

    logits: torch.Tensor
    loss: torch.Tensor | None
    aux_loss: torch.Tensor
    layer_outputs: list[Any] = field(default_factory=list)


@dataclass
class BlockOutput:
    """One block's result: the new residual stream, its aux loss, and its FFN's raw output (None if a tensor)."""

    x: torch.Tensor
    aux_loss: torch.Tensor
    ffn_output: Any = None


@dataclass
class BlocksOutput:
    """The stack's result (see `TinyTransformer._run_blocks`)."""

    x: torch.Tensor
    aux_loss: torch.Tensor
    layer_outputs: list[Any]


def unpack_module_output(output: Any, *, like: torch.Tensor, where: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split a plugged module's output into (y, aux_loss or None), checking y has the shape of its input `like`."""
    if isinstance(output, torch.Tensor):
        y, aux = output, None
    elif hasattr(output, "y"):
        y, aux = output.y, getattr(output, "aux_loss", None)
    else:
        raise TypeError(
            f"{where} must return a Tensor or an object with attribute `y` (and optional `aux_loss`), "
            f"got {type(output).__name__}"
        )
    if not isinstance(y, torch.Tensor) or y.shape != like.shape:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"{where} must return y of shape {tuple(like.shape)} (its input's shape), got {got}")
    if aux is not None and (not isinstance(aux, torch.Tensor) or aux.dim() != 0):
        got = tuple(aux.shape) if isinstance(aux, torch.Tensor) else type(aux).__name__
        raise ValueError(f"{where} must return aux_loss as a scalar (0-d) tensor or None, got {got}")
    return y, aux


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused q/k/v projection.

    softmax(q kᵀ / sqrt(d_head) + causal mask) v, per head, via `F.scaled_dot_product_attention(is_causal=True)`.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.n_heads, self.d_model, self.seq_len = config.n_heads, config.d_model, config.seq_len
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, d_model = x.shape
        # (B, T, 3 d_model) -> three (B, T, d_model)
        q, k, v = self.qkv(x).split(d_model, dim=2)
        # (B, T, d_model) -> (B, n_heads, T, d_head)
        q, k, v = (t.view(batch, time, self.n_heads, d_model // self.n_heads).transpose(1, 2) for t in (q, k, v))
        # softmax(q kᵀ / sqrt(d_head) + mask) v : (B, n_heads, T, d_head)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        # heads back side by side: (B, T, d_model)
        y = y.transpose(1, 2).contiguous().view(batch, time, d_model)
        return self.resid_dropout(self.proj(y))

    def attention_flops_per_token(self, *, seq_len: int | None = None) -> int:
        """FLOPs per token spent on scores and the weighted sum of values, which no weight matrix accounts for."""
        context = self.seq_len if seq_len is None else seq_len
        # q·k over `context` keys, then a weighted sum of `context` values: 2 products x 2 FLOPs x context x d_model
        # (Kaplan et al. 2020; the causal mask is not halved)
        return 2 * 2 * context * self.d_model


class MLP(nn.Module):
    """The position-wise FFN: d_model -> d_hidden -> d_model with a GELU in between."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.ffn_hidden)
        self.act = nn.GELU()
        self.proj = nn.Linear(config.ffn_hidden, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # FFN(x) = W_2 GELU(W_1 x + b_1) + b_2 : (B, T, d_model) -> (B, T, d_hidden) -> (B, T, d_model)
        return self.dropout(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """A pre-LayerNorm transformer block; `attn` and `ffn` are any modules that keep the (B, T, d_model) shape."""

    def __init__(self, config: TransformerConfig, *, attn: nn.Module, ffn: nn.Module) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.d_model)
        self.attn = attn
        self.ffn_norm = nn.LayerNorm(config.d_model)
        self.ffn = ffn

    def forward(self, x: torch.Tensor, **ffn_kwargs: Any) -> BlockOutput:
        """`ffn_kwargs` go to the FFN as keywords (none by default; `lablib.moe.MoETransformer` passes routing
        context such as token ids and a recurrent router state)."""
        # x + Attn(LN(x)) : (B, T, d_model)
        attn_y, attn_aux = unpack_module_output(self.attn(self.attn_norm(x)), like=x, where="attention module")
        x = x + attn_y
        # x + FFN(LN(x)) : (B, T, d_model)
        raw = self.ffn(self.ffn_norm(x), **ffn_kwargs)
        ffn_y, ffn_aux = unpack_module_output(raw, like=x, where="ffn module")
        x = x + ffn_y
        aux_loss = x.new_zeros(())
        for aux in (attn_aux, ffn_aux):
            if aux is not None:
                aux_loss = aux_loss + aux
        return BlockOutput(x=x, aux_loss=aux_loss, ffn_output=None if isinstance(raw, torch.Tensor) else raw)


def _default_attn(layer_idx: int, config: TransformerConfig) -> nn.Module:
    return CausalSelfAttention(config)


def _default_ffn(layer_idx: int, config: TransformerConfig) -> nn.Module:
    return MLP(config)


def _build(factory: ModuleFactory, layer_idx: int, config: TransformerConfig, kind: str) -> nn.Module:
    module = factory(layer_idx, config)
    if not isinstance(module, nn.Module):
        raise TypeError(f"{kind}_factory({layer_idx}, config) must return an nn.Module, got {type(module).__name__}")
    return module


class TinyTransformer(nn.Module):
    """A GPT-style language model whose attention and FFN modules are pluggable (see the module docstring).

    Arguments:
    * `config`: a `TransformerConfig`.
    * `ffn_factory`, `attn_factory`: `factory(layer_idx, config) -> nn.Module`, called once per layer in order
      0..n_layers-1; default `MLP(config)` and `CausalSelfAttention(config)`.
    """

    def __init__(
        self,
        config: TransformerConfig,
        *,
        ffn_factory: ModuleFactory | None = None,
        attn_factory: ModuleFactory | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}")
        self.config = config
        ffn_factory = ffn_factory or _default_ffn
        attn_factory = attn_factory or _default_attn
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.seq_len, config.d_model)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(
                config,
                attn=_build(attn_factory, i, config, "attn"),
                ffn=_build(ffn_factory, i, config, "ffn"),
            )
            for i in range(config.n_layers)
        )
        self.final_norm = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # one (vocab_size, d_model) matrix both embeds tokens and scores them (Press & Wolf 2017)
            self.lm_head.weight = self.token_embedding.weight
        self.init_weights()

    def init_weights(self) -> None:
        """nanoGPT initialisation (see the module docstring), then each submodule's own `init_weights()`."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for name, param in self.named_parameters():
            if name.endswith(".proj.weight"):
                # 2 n_layers residual branches each add variance to the stream: std 0.02 / sqrt(2 n_layers)
                nn.init.normal_(param, mean=0.0, std=INIT_STD / math.sqrt(2 * self.config.n_layers))
        for module in self.modules():
            if module is not self and callable(getattr(module, "init_weights", None)):
                module.init_weights()

    def _check_tokens(self, tokens: torch.Tensor, *, what: str) -> None:
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(tokens).__name__}")
        if tokens.dim() != 2:
            raise ValueError(f"{what} must have shape (batch, time), got shape {tuple(tokens.shape)}")
        if tokens.dtype != torch.long:
            raise TypeError(f"{what} must be int64 (torch.long) token ids, got dtype {tokens.dtype}")
        if tokens.numel():
            low, high = int(tokens.min()), int(tokens.max())
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(
                    f"{what} values must be token ids in [0, {self.config.vocab_size}), got min {low}, max {high}"
                )

    def _block_context(self, idx: torch.Tensor) -> dict[str, Any]:
        """Keyword arguments `forward` passes to `_run_blocks` besides x: none here. A subclass whose FFNs need the
        input token ids (hash routing in `lablib.moe.MoETransformer`) returns them and accepts them in `_run_blocks`."""
        return {}

    def _run_blocks(self, x: torch.Tensor) -> BlocksOutput:
        """Apply the blocks in order. Override to loop, skip or route blocks (recursive transformers, MoD...)."""
        aux_loss = x.new_zeros(())
        layer_outputs: list[Any] = []
        for block in self.blocks:
            out = block(x)
            x, aux_loss = out.x, aux_loss + out.aux_loss
            layer_outputs.append(out.ffn_output)
        return BlocksOutput(x=x, aux_loss=aux_loss, layer_outputs=layer_outputs)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> LMOutput:
        self._check_tokens(idx, what="idx")
        batch, time = idx.shape
        if not 1 <= time <= self.config.seq_len:
            raise ValueError(
                f"idx has length {time} but the model's seq_len is {self.config.seq_len}; "
                f"pass 1 to {self.config.seq_len} tokens (crop with idx[:, -seq_len:])"
            )
        if targets is not None:
            self._check_tokens(targets, what="targets")
            if targets.shape != idx.shape:
                raise ValueError(
                    f"targets must have the shape of idx {tuple(idx.shape)}, got {tuple(targets.shape)}"
                )
        positions = torch.arange(time, device=idx.device)
        # x_0 = E_tok[idx] + E_pos[t] : (B, T, d_model)
        x = self.embedding_dropout(self.token_embedding(idx) + self.position_embedding(positions))
        stack = self._run_blocks(x, **self._block_context(idx))
        # (B, T, d_model) -> (B, T, vocab_size)
        logits = self.lm_head(self.final_norm(stack.x))
        loss = None
        if targets is not None:
            # L = -mean_{b,t} log softmax(logits[b, t])[targets[b, t]]
            loss = F.cross_entropy(logits.reshape(batch * time, -1), targets.reshape(batch * time))
        return LMOutput(logits=logits, loss=loss, aux_loss=stack.aux_loss, layer_outputs=stack.layer_outputs)


@torch.no_grad()
def generate(
    model: nn.Module,
    idx: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample `max_new_tokens` tokens autoregressively after `idx` (B, T0); returns a new (B, T0 + max_new_tokens).

    The context fed to the model is cropped to its last `model.config.seq_len` tokens. `temperature=0` means greedy
    (argmax); `top_k` keeps only the k most likely tokens before sampling. With the same `generator` state the
    output is the same (the generator must live on the model's device). `idx` is not modified; the model is put in eval mode and its previous mode restored.
    """
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype != torch.long:
        got = f"shape {tuple(idx.shape)}, dtype {idx.dtype}" if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise ValueError(f"idx must be an int64 tensor of shape (batch, time), got {got}")
    if idx.shape[1] < 1:
        raise ValueError("idx must hold at least one token per row to condition on, got shape " f"{tuple(idx.shape)}")
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    seq_len = getattr(getattr(model, "config", None), "seq_len", None)
    if not _is_int(seq_len):
        raise TypeError(f"generate needs a model with `config.seq_len` (a TinyTransformer), got {type(model).__name__}")
    was_training = model.training
    model.eval()
    try:
        out = idx.clone()
        for _ in range(max_new_tokens):
            context = out[:, -seq_len:]
            result = model(context)
            logits = result.logits if hasattr(result, "logits") else result
            # scores for the next token only: (B, vocab_size)
            logits = logits[:, -1, :].float()
            if temperature == 0:
                next_token = logits.argmax(dim=-1, keepdim=True)
            else:
                # p = softmax(logits / temperature), restricted to the top_k scores
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                next_token = torch.multinomial(probs, num_samples=1, generator=generator)
            out = torch.cat([out, next_token], dim=1)
    finally:
        model.train(was_training)
    return out


class MLPClassifier(nn.Module):
    """A plain multilayer perceptron: in_features -> hidden_sizes... -> num_classes logits.

    `hidden_sizes=[]` gives multinomial logistic regression. Layers use PyTorch's default initialisation, which
    `torch.manual_seed` makes reproducible.
    """

    def __init__(
        self, *, in_features: int, hidden_sizes: Sequence[int], num_classes: int, activation: str = "relu"
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
        sizes = [in_features, *hidden_sizes, num_classes]
        for name, value in [("in_features", in_features), ("num_classes", num_classes)] + [
            (f"hidden_sizes[{i}]", h) for i, h in enumerate(hidden_sizes)
        ]:
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.in_features, self.num_classes, self.activation_name = in_features, num_classes, activation
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.act = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.in_features:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (batch, {self.in_features}), got {got}")
        # h_{i+1} = act(W_i h_i + b_i) : (B, in_features) -> ... -> (B, num_classes), no act on the logits
        for layer in self.layers[:-1]:
            x = self.act(layer(x))
        return self.layers[-1](x)

    def extra_repr(self) -> str:
        return f"activation={self.activation_name!r}"
