"""A small transformer without LayerNorm, written out in PyTorch with TransformerLens hook names.

Two kinds of model use it: the compiled tracr programs (weights set by the compiler, bidirectional
attention, float64) and the trained toy models (random initialisation, causal attention, float32,
often attention-only). Both are `HookedRootModule`s, so `mechscope.attribute`, `evaluate`, the
patching sweeps and the lenses run on them as on a `TransformerBridge`.

The forward pass, per layer: token and position embeddings into the residual stream; attention with
scores divided by sqrt(d_head) (or `attn_scale`); an MLP (ReLU or GELU) unless `d_mlp` is 0; the
unembedding. The hook points are TransformerLens' (`hook_embed`, `hook_pos_embed`,
`blocks.{l}.hook_resid_pre`, `hook_q_input/k_input/v_input`, `attn.hook_q/k/v/attn_scores/pattern/z/
result`, `hook_attn_out`, `hook_resid_mid`, `hook_mlp_in/out`, `mlp.hook_pre/post`, `hook_resid_post`,
`ln_final.hook_in/out`, `unembed.hook_in/out`) with TransformerLens shapes.

An attention-only model (`d_mlp == 0`) still passes a zero tensor through `hook_mlp_out`, so a
circuit graph's MLP nodes exist for it and carry no signal (their edges score exactly zero).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from ..devices import HOST

ACTIVATIONS = {"relu": torch.relu, "gelu": nn.functional.gelu}


@dataclass
class ToyConfig:
    """The TransformerLens config fields mechscope reads, for a model written out here."""

    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    d_vocab: int
    n_ctx: int
    d_mlp: int = 0  # 0: attention-only
    d_vocab_out: int = -1  # -1: the same as d_vocab
    model_name: str = "toy"
    attention_dir: str = "causal"
    normalization_type: str | None = None
    positional_embedding_type: str = "standard"
    act_fn: str = "relu"
    attn_scale: float = 0.0  # 0: sqrt(d_head)
    eps: float = 0.0
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")

    def __post_init__(self):
        if self.d_vocab_out == -1:
            self.d_vocab_out = self.d_vocab
        for name in ("n_layers", "n_heads", "d_model", "d_head", "d_vocab", "n_ctx", "d_vocab_out"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.d_mlp < 0:
            raise ValueError(f"d_mlp must be 0 (attention-only) or more, got {self.d_mlp}")
        if self.attention_dir not in ("causal", "bidirectional"):
            raise ValueError(f"attention_dir must be 'causal' or 'bidirectional', got {self.attention_dir!r}")
        if self.act_fn not in ACTIVATIONS:
            raise ValueError(f"act_fn must be one of {sorted(ACTIVATIONS)}, got {self.act_fn!r}")
        self.device = torch.device(self.device)

    @property
    def n_key_value_heads(self) -> int:
        return self.n_heads

    @property
    def attn_only(self) -> bool:
        return self.d_mlp == 0

    def to_dict(self) -> dict:
        """JSON-ready fields (dtype as its name; the device is where the model is loaded, not saved)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "device"}
        out["dtype"] = str(self.dtype).removeprefix("torch.")
        return out

    @classmethod
    def from_dict(cls, data: dict, device=None) -> "ToyConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; expected some of {sorted(known)}")
        data = dict(data)
        if "dtype" in data:
            data["dtype"] = getattr(torch, str(data["dtype"]))
        if device is not None:
            data["device"] = torch.device(device)
        return cls(**data)

    def replace(self, **changes) -> "ToyConfig":
        return type(self)(**{**asdict(self), **changes})


class _Container(nn.Module):
    """A module that only holds hook points, so their names follow TransformerLens' paths."""

    def __init__(self, *names: str):
        super().__init__()
        for name in names:
            setattr(self, name, HookPoint())


class _Attention(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        h, d, e = cfg.n_heads, cfg.d_model, cfg.d_head
        kw = dict(dtype=cfg.dtype, device=cfg.device)
        self.W_Q = nn.Parameter(torch.zeros(h, d, e, **kw))
        self.W_K = nn.Parameter(torch.zeros(h, d, e, **kw))
        self.W_V = nn.Parameter(torch.zeros(h, d, e, **kw))
        self.W_O = nn.Parameter(torch.zeros(h, e, d, **kw))
        self.b_Q = nn.Parameter(torch.zeros(h, e, **kw))
        self.b_K = nn.Parameter(torch.zeros(h, e, **kw))
        self.b_V = nn.Parameter(torch.zeros(h, e, **kw))
        self.b_O = nn.Parameter(torch.zeros(d, **kw))
        for name in ("hook_q", "hook_k", "hook_v", "hook_attn_scores", "hook_pattern", "hook_z", "hook_result"):
            setattr(self, name, HookPoint())


class _MLP(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        kw = dict(dtype=cfg.dtype, device=cfg.device)
        self.W_in = nn.Parameter(torch.zeros(cfg.d_model, cfg.d_mlp, **kw))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp, **kw))
        self.W_out = nn.Parameter(torch.zeros(cfg.d_mlp, cfg.d_model, **kw))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model, **kw))
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()


class _Block(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.attn = _Attention(cfg)
        if cfg.d_mlp:
            self.mlp = _MLP(cfg)
        for name in ("hook_resid_pre", "hook_q_input", "hook_k_input", "hook_v_input", "hook_attn_out",
                     "hook_resid_mid", "hook_mlp_in", "hook_mlp_out", "hook_resid_post"):
            setattr(self, name, HookPoint())


class HookedToyTransformer(HookedRootModule):
    """`model(tokens, attention_mask=None)` returns [batch, pos, d_vocab_out] logits.

    `attention_mask` ([batch, pos], 1 for real tokens) masks padding keys; causal models also mask
    later keys. Parameters start at zero; `init_weights(seed)` draws a random start."""

    def __init__(self, cfg: ToyConfig, tokenizer=None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        kw = dict(dtype=cfg.dtype, device=cfg.device)
        self.W_E = nn.Parameter(torch.zeros(cfg.d_vocab, cfg.d_model, **kw))
        self.W_pos = nn.Parameter(torch.zeros(cfg.n_ctx, cfg.d_model, **kw))
        self.W_U = nn.Parameter(torch.zeros(cfg.d_model, cfg.d_vocab_out, **kw))
        self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab_out, **kw))
        self.hook_embed = HookPoint()
        self.hook_pos_embed = HookPoint()
        self.blocks = nn.ModuleList([_Block(cfg) for _ in range(cfg.n_layers)])
        self.ln_final = _Container("hook_in", "hook_out")
        self.unembed = _Container("hook_in", "hook_out")
        self.split_qkv_input = False
        self.use_hook_mlp_in = False
        self.use_attn_result = False
        self.setup()

    def init_weights(self, seed: int = 0) -> "HookedToyTransformer":
        """Normal weights with std 1/sqrt(fan-in), biases zero. Drawn on the host with `seed`, so the
        same seed gives the same model on every device."""
        gen = torch.Generator(device=HOST).manual_seed(seed)
        fan_in = {"W_E": self.cfg.d_model, "W_pos": self.cfg.d_model, "W_Q": self.cfg.d_model,
                  "W_K": self.cfg.d_model, "W_V": self.cfg.d_model, "W_O": self.cfg.d_head * self.cfg.n_heads,
                  "W_in": self.cfg.d_model, "W_out": max(self.cfg.d_mlp, 1), "W_U": self.cfg.d_model}
        with torch.no_grad():
            for name, param in self.named_parameters():
                leaf = name.rsplit(".", 1)[-1]
                if leaf in fan_in:
                    draw = torch.randn(param.shape, generator=gen, dtype=torch.float32, device=HOST)
                    param.copy_(draw / math.sqrt(fan_in[leaf]))
                else:
                    param.zero_()
        return self

    # TransformerLens switches ----------------------------------------------------------------------
    def set_use_split_qkv_input(self, on: bool) -> None:
        self.split_qkv_input = bool(on)

    def set_use_hook_mlp_in(self, on: bool) -> None:
        self.use_hook_mlp_in = bool(on)

    def set_use_attn_result(self, on: bool) -> None:
        self.use_attn_result = bool(on)

    # Stacked weights, as TransformerLens exposes them ----------------------------------------------
    def _stack(self, name: str, part: str = "attn") -> torch.Tensor:
        return torch.stack([getattr(getattr(b, part), name) for b in self.blocks])

    @property
    def W_Q(self):
        return self._stack("W_Q")

    @property
    def W_K(self):
        return self._stack("W_K")

    @property
    def W_V(self):
        return self._stack("W_V")

    @property
    def W_O(self):
        return self._stack("W_O")

    @property
    def W_in(self):
        return self._stack("W_in", "mlp")

    @property
    def W_out(self):
        return self._stack("W_out", "mlp")

    # Forward ---------------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.cfg
        b, t = tokens.shape
        if t > cfg.n_ctx:
            raise ValueError(f"input length {t} exceeds the model's context of {cfg.n_ctx}")
        tokens = tokens.to(self.W_E.device)
        x = self.hook_embed(self.W_E[tokens]) + self.hook_pos_embed(self.W_pos[:t])[None]
        allowed = None
        if attention_mask is not None:
            allowed = attention_mask.to(x.device).bool()[:, None, None, :]  # [b, 1, 1, t'] keys
        if cfg.attention_dir == "causal":
            causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()[None, None]
            allowed = causal if allowed is None else allowed & causal
        scale = cfg.attn_scale if cfg.attn_scale > 0 else math.sqrt(cfg.d_head)
        act = ACTIVATIONS[cfg.act_fn]
        for block in self.blocks:
            x = block.hook_resid_pre(x)
            attn = block.attn
            if self.split_qkv_input:
                expand = x[:, :, None, :].expand(b, t, cfg.n_heads, cfg.d_model)
                qi, ki, vi = (block.hook_q_input(expand), block.hook_k_input(expand), block.hook_v_input(expand))
                q = torch.einsum("bthd,hde->bthe", qi, attn.W_Q)
                k = torch.einsum("bthd,hde->bthe", ki, attn.W_K)
                v = torch.einsum("bthd,hde->bthe", vi, attn.W_V)
            else:
                q = torch.einsum("btd,hde->bthe", x, attn.W_Q)
                k = torch.einsum("btd,hde->bthe", x, attn.W_K)
                v = torch.einsum("btd,hde->bthe", x, attn.W_V)
            q, k, v = attn.hook_q(q + attn.b_Q), attn.hook_k(k + attn.b_K), attn.hook_v(v + attn.b_V)
            scores = torch.einsum("bthe,bshe->bhts", q, k) / scale
            if allowed is not None:
                scores = scores.masked_fill(~allowed, float("-inf"))
            scores = attn.hook_attn_scores(scores)
            pattern = attn.hook_pattern(torch.softmax(scores, dim=-1))
            z = attn.hook_z(torch.einsum("bhts,bshe->bthe", pattern, v))
            if self.use_attn_result:
                result = attn.hook_result(torch.einsum("bthe,hed->bthd", z, attn.W_O))
                attn_out = result.sum(2) + attn.b_O
            else:
                attn_out = torch.einsum("bthe,hed->btd", z, attn.W_O) + attn.b_O
            x = block.hook_resid_mid(x + block.hook_attn_out(attn_out))
            mlp_in = block.hook_mlp_in(x.clone()) if self.use_hook_mlp_in else x
            if cfg.d_mlp:
                pre = block.mlp.hook_pre(mlp_in @ block.mlp.W_in + block.mlp.b_in)
                post = block.mlp.hook_post(act(pre))
                mlp_out = post @ block.mlp.W_out + block.mlp.b_out
            else:
                mlp_out = torch.zeros_like(x)
            x = block.hook_resid_post(x + block.hook_mlp_out(mlp_out))
        x = self.ln_final.hook_out(self.ln_final.hook_in(x))  # no normalisation
        return self.unembed.hook_out(self.unembed.hook_in(x) @ self.W_U + self.b_U)

    def residuals(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """The residual stream after every sublayer (attention, then MLP, per layer)."""
        out: list[torch.Tensor] = []
        names = [n for l in range(self.cfg.n_layers) for n in (f"blocks.{l}.hook_resid_mid", f"blocks.{l}.hook_resid_post")]
        hooks = [(n, lambda x, hook=None: out.append(x.detach()) or x) for n in names]
        with self.hooks(fwd_hooks=hooks):
            self(tokens)
        return out
