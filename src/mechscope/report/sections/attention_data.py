"""The attention viewer's data: the patterns of chosen heads on a few examples, clean and
counterfactual, quantised to bytes (a pattern is a probability: 1/255 resolution is enough to read)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ...devices import model_device
from ...errors import ParameterError
from ..page import column


def head_name(layer: int, head: int) -> str:
    return f"a{layer}.h{head}"


@torch.no_grad()
def attention_payload(model, dataset, heads: Sequence[tuple[int, int]], n_examples: int = 4) -> dict:
    """Patterns [example, (clean, counterfactual), head, query, key] of `heads` ((layer, head) pairs)
    on the first `n_examples` examples of `dataset`, with their tokens and span names."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    for l, h in heads:
        if not (0 <= l < n_layers and 0 <= h < n_heads):
            raise ParameterError(f"head a{l}.h{h} is not in a model with {n_layers} layers of {n_heads} heads")
    examples = dataset.examples[:max(0, n_examples)]
    layers = sorted({l for l, _ in heads})
    names = {f"blocks.{l}.attn.hook_pattern" for l in layers}
    T = max((max(len(ex.clean), len(ex.counterfactual)) for ex in examples), default=0)
    patterns = np.zeros((len(examples), 2, len(heads), T, T), dtype=np.uint8)
    entries = []
    span_names = dataset.schema.spans
    decode = model.tokenizer.decode
    for i, ex in enumerate(examples):
        entry = {"label": f"example {i}: {ex.clean_text}" if getattr(ex, "clean_text", None) else f"example {i}"}
        for j, (which, tokens) in enumerate((("clean", ex.clean), ("counterfactual", ex.counterfactual))):
            ids = torch.tensor([tokens], device=model_device(model))
            _, cache = model.run_with_cache(ids, names_filter=lambda n: n in names)
            for k, (l, h) in enumerate(heads):
                p = cache[f"blocks.{l}.attn.hook_pattern"][0, h].float().cpu().numpy()
                patterns[i, j, k, :len(tokens), :len(tokens)] = np.rint(np.clip(p, 0, 1) * 255).astype(np.uint8)
            spans = ex.span_of_positions()  # clean and counterfactual prompts share their span bounds
            entry[which] = {"tokens": [decode([t]) for t in tokens],
                            "spans": [span_names[s] for s in spans][:len(tokens)]}
        entries.append(entry)
    return {"heads": [head_name(l, h) for l, h in heads], "examples": entries,
            "patterns": column(patterns.reshape(-1), "u8"), "T": T}

