"""Tiny random models with a real (trained here) byte-level BPE tokenizer, for fast unit tests.

Everything is built offline in a second or two: a BPE tokenizer trained on a small corpus of the
built-in tasks' vocabulary, and GPT-2 / Llama / Gemma-3 configurations with a few layers and random weights,
saved as ordinary Hugging Face directories so they load through the same path as any local model.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

NAMES = ["Mary", "John", "Alice", "Bob", "Sarah", "Tom", "Anna", "James", "Kate", "Paul", "Laura", "Mark"]
PLACES = ["store", "park", "school", "garden", "office", "station"]
OBJECTS = ["drink", "book", "ball", "gift", "letter", "ring"]
JOBS = ["designer", "analyst", "nurse", "doctor", "lawyer", "baker", "clerk", "driver"]


def corpus() -> list[str]:
    lines = []
    for a, b in itertools.permutations(NAMES[:8], 2):
        for place, obj in zip(PLACES, OBJECTS):
            lines.append(f"When {a} and {b} went to the {place}, {b} gave a {obj} to {a}.")
            lines.append(f"Then, {a} and {b} had a long day at the {place}. {a} gave a {obj} to {b}.")
    for year in range(1700, 1800, 3):
        lines.append(f"The war lasted from the year {year} to the year {year + 5}.")
    for j1, j2 in itertools.permutations(JOBS, 2):
        lines.append(
            f"The {j1} was good friends with the {j2} because she liked everyone. "
            f"The pronoun she refers to the {j1}."
        )
    lines.append("0 1 2 3 4 5 6 7 8 9 00 01 10 11 99 the a an of to and he she his her it")
    return lines


def build_tokenizer(vocab_size: int = 700, extra_lines: tuple[str, ...] = ()):
    """The BPE tokenizer of `corpus()` (plus `extra_lines`, for tests of a task of their own)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|bos|>", "<|eos|>", "<|pad|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus() + list(extra_lines), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )


def build_model(arch: str, tokenizer, seed: int = 0, n_layers: int = 2):
    """A randomly initialised causal LM with `n_layers` layers ('gpt2', 'llama' or 'gemma3')."""
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "gpt2":
        config = GPT2Config(n_layer=n_layers, n_head=4, n_embd=64, n_positions=128, **common)
        model = GPT2LMHeadModel(config)
    elif arch == "llama":
        config = LlamaConfig(
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,  # grouped-query attention, as in SmolLM2
            hidden_size=64,
            intermediate_size=128,
            max_position_embeddings=128,
            tie_word_embeddings=False,
            **common,
        )
        model = LlamaForCausalLM(config)
    elif arch == "gemma3":
        # Norms before and after each sublayer, per-head q/k norms, scores scaled by
        # query_pre_attn_scalar**-0.5 (not d_head's), local and global layers with their own rotary
        # bases, tied and sqrt(d_model)-scaled embeddings, as in Gemma-3-270M.
        layer_types = ["sliding_attention", "full_attention"] * n_layers
        config = Gemma3TextConfig(
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            hidden_size=64,
            intermediate_size=128,
            max_position_embeddings=128,
            query_pre_attn_scalar=24,
            sliding_window=64,
            layer_types=layer_types[:n_layers],
            rope_parameters={
                "full_attention": {"rope_theta": 1e6, "rope_type": "default"},
                "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"},
            },
            tie_word_embeddings=True,
            **common,
        )
        model = Gemma3ForCausalLM(config)
    else:
        raise ValueError(arch)
    # Random init gives near-uniform predictions; larger weights make differences visible in tests.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
            elif arch == "gemma3" and "norm" in name:
                p.normal_(0.0, 0.3)  # Gemma stores norm weights as offsets from 1, initialised to 0
    return model.eval()


def save_model_dir(path: Path, arch: str, tokenizer, seed: int = 0, n_layers: int = 2) -> Path:
    model = build_model(arch, tokenizer, seed=seed, n_layers=n_layers)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
