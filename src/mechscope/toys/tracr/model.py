"""Tracr-compiled transformers as hooked PyTorch models with TransformerLens hook names.

Tracr (Lindner et al. 2023) compiles a RASP program into the weights of a transformer without
LayerNorm: one-hot token and position embeddings into a residual stream whose every dimension is a
labelled basis direction (`tokens:a`, `indices:3`, `one`, an SOp's value, ...), attention with scores
divided by sqrt(key size), ReLU MLPs, and an unembedding that is the projection onto the output
SOp's directions.

`CompiledTransformer` computes exactly that forward pass in PyTorch and exposes the hook points the
rest of mechscope uses (`blocks.{l}.hook_resid_pre`, `hook_q_input/k_input/v_input`,
`attn.hook_q/k/v/z/attn_scores/pattern`, `hook_mlp_in/out`, `ln_final.hook_in`, ...) with
TransformerLens shapes, and the weight properties (`W_Q`, `W_O`, `W_U`, ...).

It is a `HookedRootModule` of its own rather than a TransformerBridge around TransformerLens 4's
native model, because the bridge's native attention offers no hook before the q/k/v projections
(`set_use_split_qkv_input` raises for it), and edge ablation needs one per head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint


@dataclass
class CompiledConfig:
    """The subset of TransformerLens' config fields that mechscope reads, for a compiled model."""

    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int
    d_vocab_out: int
    n_ctx: int
    model_name: str = "tracr"
    attention_dir: str = "bidirectional"
    normalization_type: str | None = None
    positional_embedding_type: str = "standard"
    act_fn: str = "relu"
    attn_scale: float = 1.0
    eps: float = 0.0
    dtype: torch.dtype = torch.float64
    device: torch.device = torch.device("cpu")

    @property
    def n_key_value_heads(self) -> int:
        return self.n_heads


class _Container(nn.Module):
    """A module that only holds hook points, so their names follow TransformerLens' paths."""

    def __init__(self, *names: str):
        super().__init__()
        for name in names:
            setattr(self, name, HookPoint())


class _Attention(nn.Module):
    def __init__(self, cfg: CompiledConfig):
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
    def __init__(self, cfg: CompiledConfig):
        super().__init__()
        kw = dict(dtype=cfg.dtype, device=cfg.device)
        self.W_in = nn.Parameter(torch.zeros(cfg.d_model, cfg.d_mlp, **kw))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp, **kw))
        self.W_out = nn.Parameter(torch.zeros(cfg.d_mlp, cfg.d_model, **kw))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model, **kw))
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()


class _Block(nn.Module):
    def __init__(self, cfg: CompiledConfig):
        super().__init__()
        self.attn = _Attention(cfg)
        self.mlp = _MLP(cfg)
        for name in ("hook_resid_pre", "hook_q_input", "hook_k_input", "hook_v_input", "hook_attn_out",
                     "hook_resid_mid", "hook_mlp_in", "hook_mlp_out", "hook_resid_post"):
            setattr(self, name, HookPoint())


class CompiledTransformer(HookedRootModule):
    """A tracr model in PyTorch; `model(tokens, attention_mask=None)` returns [batch, pos, d_vocab_out]
    logits (the residual stream projected onto the output directions).

    Attention is bidirectional, as tracr compiles it by default; `attention_mask` ([batch, pos], 1 for
    real tokens) masks padding keys."""

    def __init__(self, cfg: CompiledConfig, tokenizer=None):
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
        self.requires_grad_(False)
        self.setup()

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
            raise ValueError(f"input length {t} exceeds the compiled context of {cfg.n_ctx} (BOS included)")
        tokens = tokens.to(self.W_E.device)
        x = self.hook_embed(self.W_E[tokens]) + self.hook_pos_embed(self.W_pos[:t])[None]
        allowed = None
        if attention_mask is not None:
            allowed = attention_mask.to(x.device).bool()[:, None, None, :]  # [b, 1, 1, t'] keys
        scale = cfg.attn_scale if cfg.attn_scale > 0 else math.sqrt(cfg.d_head)
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
            pre = block.mlp.hook_pre(mlp_in @ block.mlp.W_in + block.mlp.b_in)
            post = block.mlp.hook_post(torch.relu(pre))
            x = block.hook_resid_post(x + block.hook_mlp_out(post @ block.mlp.W_out + block.mlp.b_out))
        x = self.ln_final.hook_out(self.ln_final.hook_in(x))  # no normalisation in tracr models
        return self.unembed.hook_out(self.unembed.hook_in(x) @ self.W_U + self.b_U)

    def residuals(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """The residual stream after every sublayer (attention, then MLP, per layer), as tracr's own
        forward pass reports it."""
        out: list[torch.Tensor] = []
        names = [n for l in range(self.cfg.n_layers) for n in (f"blocks.{l}.hook_resid_mid", f"blocks.{l}.hook_resid_post")]
        hooks = [(n, lambda x, hook=None: out.append(x.detach()) or x) for n in names]
        with self.hooks(fwd_hooks=hooks):
            self(tokens)
        return out
