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


# Hugging Face Llama parameter -> GGUF tensor name ("{i}" is the layer).
_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
}


def _rotary_order(weight, n_heads: int):
    """GGUF stores q and k rows of each head with the two rotary halves interleaved (transformers
    undoes this when it reads the file)."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def save_llama_gguf(path: Path, model_dir: Path) -> Path:
    """Write the tiny Llama saved in `model_dir` as an unquantized (float32) GGUF file, with its
    byte-level BPE tokenizer, so tests run the real GGUF conversion on something small."""
    import json
    import re

    import gguf
    import numpy as np
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(Path(path).stem)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    tokens = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control, 1: normal
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)

    templates = {hf.replace("{i}", r"(\d+)"): g for hf, g in _GGUF_NAMES.items()}
    for name, tensor in model.state_dict().items():
        for pattern, gguf_name in templates.items():
            match = re.fullmatch(pattern, name)
            if match:
                break
        else:
            raise KeyError(f"no GGUF name for {name}")
        weight = tensor.detach().numpy().astype(np.float32)
        if ".q_proj." in name:
            weight = _rotary_order(weight, cfg.num_attention_heads)
        elif ".k_proj." in name:
            weight = _rotary_order(weight, cfg.num_key_value_heads)
        writer.add_tensor(gguf_name.replace("{i}", match.group(1) if match.groups() else ""),
                          np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
