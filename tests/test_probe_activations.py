"""`probes.activations.collect` reads every hook point in one pass per batch and equals reading each
text alone with run_with_cache, at every kind of position."""

from __future__ import annotations

import pytest
import torch

import mechscope
from mechscope.probes.activations import ActivationError, collect, resid_points, tokenize_texts

TEXTS = ["The cat sat on the mat", "Hello", "Two plus two is four, said the teacher", "Alice and Bob went"]


@pytest.fixture(scope="module")
def model(tiny_model_dirs):
    return mechscope.load_model(str(tiny_model_dirs["llama"]), device="cpu")


@pytest.mark.parametrize("position", ["last", "mean", 1, -2])
def test_collect_equals_one_text_at_a_time(model, position):
    points = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.0.hook_mlp_out"]
    got = collect(model, TEXTS, points, position=position, batch_size=3, progress=False)
    for i, ids in enumerate(tokenize_texts(model.tokenizer, TEXTS)):
        _, cache = model.run_with_cache(torch.tensor([ids]))
        for p in points:
            act = cache[p][0]
            if position == "last":
                want = act[-1]
            elif position == "mean":
                want = act[1:].mean(0) if len(ids) > 1 else torch.zeros_like(act[0])
            else:
                want = act[position]
            assert torch.allclose(got[p][i], want.float(), atol=1e-5), (p, i)


def test_every_layer_by_default_and_the_early_stop_reads_the_same(model):
    full = collect(model, TEXTS, progress=False)
    assert list(full) == resid_points(model)
    early = collect(model, TEXTS, ["blocks.0.hook_resid_post"], progress=False)
    assert torch.equal(early["blocks.0.hook_resid_post"], full["blocks.0.hook_resid_post"])


def test_bad_input_names_the_problem(model):
    with pytest.raises(ActivationError, match="unknown hook point 'blocks.0.hook_nothing'"):
        collect(model, TEXTS, ["blocks.0.hook_nothing"], progress=False)
    with pytest.raises(ActivationError, match="no texts"):
        collect(model, [], progress=False)
    with pytest.raises(ActivationError, match="text 1 is empty"):
        collect(model, ["a", " "], progress=False)
    with pytest.raises(ActivationError, match="position 9 is outside text"):
        collect(model, TEXTS, position=9, progress=False)
    with pytest.raises(ActivationError, match="position must be"):
        collect(model, TEXTS, position="first", progress=False)
