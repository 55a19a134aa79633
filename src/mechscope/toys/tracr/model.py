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

from dataclasses import dataclass

import torch

from ..transformer import HookedToyTransformer, ToyConfig


@dataclass
class CompiledConfig(ToyConfig):
    """A tracr model's config: bidirectional attention and float64, as the compiler builds it."""

    model_name: str = "tracr"
    attention_dir: str = "bidirectional"
    dtype: torch.dtype = torch.float64


class CompiledTransformer(HookedToyTransformer):
    """A tracr model in PyTorch; `model(tokens, attention_mask=None)` returns [batch, pos, d_vocab_out]
    logits (the residual stream projected onto the output directions).

    Attention is bidirectional, as tracr compiles it by default; `attention_mask` ([batch, pos], 1 for
    real tokens) masks padding keys. The weights are the compiler's and are frozen."""

    def __init__(self, cfg: CompiledConfig, tokenizer=None):
        super().__init__(cfg, tokenizer)
        self.requires_grad_(False)
