"""Shared fixtures: tiny random models (fast) and the packaged real models (marked slow)."""

from __future__ import annotations

import pytest
import tiny
import torch

PROMPTS = [
    "When Mary and John went to the store, John gave a drink to",
    "The war lasted from the year 1732 to the year 17",
    "The designer was good friends with the analyst because she liked everyone. The pronoun she refers to the",
    "Alice and Bob",
]


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run where CUDA is present and are skipped elsewhere (CI has no GPU)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return tiny.build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, tiny_tokenizer):
    """{'gpt2': dir, 'llama': dir}: saved Hugging Face directories of tiny random models."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {
        arch: tiny.save_model_dir(root / arch, arch, tiny_tokenizer, seed=i)
        for i, arch in enumerate(["gpt2", "llama"])
    }


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny_model(request, tiny_model_dirs):
    """Each tiny random model in turn (GPT-2: LayerNorm, learned positions; Llama: RMSNorm, rotary, GQA)."""
    import mechscope

    return mechscope.load_model(str(tiny_model_dirs[request.param]), device="cpu")


@pytest.fixture(scope="session")
def tiny_gemma(tmp_path_factory, tiny_tokenizer):
    """A tiny random Gemma-3 (norms after each sublayer, q/k norms, local and global layers)."""
    import mechscope

    root = tmp_path_factory.mktemp("tiny_gemma")
    path = tiny.save_model_dir(root / "gemma3", "gemma3", tiny_tokenizer, seed=2, n_layers=3)
    return mechscope.load_model(str(path), device="cpu")


@pytest.fixture(scope="session")
def gemma3():
    import mechscope

    return mechscope.load_model("gemma3-270m", device="cpu")


@pytest.fixture(scope="session")
def smollm2():
    import mechscope

    return mechscope.load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from mechscope.models import load_tokenizer

    return load_tokenizer("smollm2-135m")
