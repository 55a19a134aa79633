"""Direct logit attribution (docs/method.md §9): the terms sum to the model's own logit difference, a
head's term is its write through the model's final-norm scale, and models it cannot split are refused."""

from __future__ import annotations

import pytest
import torch

from mechscope.errors import ParameterError
from mechscope.metrics import final_logits, logit_diff
from mechscope.patching.dla import DLAResult, direct_logit_attribution
from mechscope.tasks import make_task


def model_logit_diff(model, data):
    """The logit difference from the model's full forward pass (its own final norm and unembedding)."""
    batch = data.batch()
    with torch.no_grad():
        logits = model(batch.clean, attention_mask=batch.attention_mask)
    return logit_diff(final_logits(logits, batch.last), batch)


def check_sums(model, data):
    result = direct_logit_attribution(model, data, batch_size=4, progress=False)
    expected = model_logit_diff(model, data)
    assert torch.allclose(result.last.sum(1), expected, atol=1e-4, rtol=1e-5)
    assert torch.allclose(result.logit_diff, expected, atol=1e-4, rtol=1e-5)
    return result


def test_terms_sum_to_the_logit_difference(tiny_model):
    """Identity: input + heads + MLPs (+ b_O) + b_U terms at the last position = the model's logit
    difference, per example (GPT-2: LayerNorm, learned positions, biases; Llama: RMSNorm, GQA)."""
    data = make_task("ioi", tiny_model.tokenizer, 6, seed=3)
    result = check_sums(tiny_model, data)
    n = tiny_model.cfg.n_layers * (tiny_model.cfg.n_heads + 1) + 1
    assert result.nodes[:2] == ["input", "a0.h0"] and result.nodes[-1] == "b_U"
    assert ("b_O" in result.nodes) == (tiny_model.cfg.normalization_type == "LN")  # GPT-2 has attention biases
    assert len(result.nodes) == n + 1 + ("b_O" in result.nodes)
    assert result.head_map().shape == (tiny_model.cfg.n_layers, tiny_model.cfg.n_heads)
    # Per position: the last real position of each example holds `last`; padding is NaN.
    batch = data.batch()
    rows = torch.arange(len(data))
    assert torch.equal(result.per_position[rows, :, batch.last], result.last)
    assert torch.isnan(result.per_position[~batch.attention_mask.bool()[:, None, :].expand_as(result.per_position)]).all()


def test_terms_sum_on_gemma3_with_post_norms(tiny_gemma):
    """Gemma-3 (scaled embeddings, norms after each sublayer, no logit soft-capping): exact under the
    frozen-scale split of the post-attention norm."""
    check_sums(tiny_gemma, make_task("ioi", tiny_gemma.tokenizer, 4, seed=1))


def test_a_head_term_is_its_write_through_the_final_scale(tiny_model):
    """A head's term, computed here from hook_z, W_O and the model's own ln_final.hook_scale:
    centre(z_h @ W_O[h]) . (W_U[:, c] - W_U[:, w]) / scale at the last position."""
    data = make_task("ioi", tiny_model.tokenizer, 4, seed=2)
    result = direct_logit_attribution(tiny_model, data, progress=False)
    batch = data.batch()
    seen = {}
    hooks = [(name, lambda v, hook=None, name=name: seen.__setitem__(name, v.detach()) or v)
             for name in ("blocks.1.attn.hook_z", "ln_final.hook_scale")]
    with torch.no_grad(), tiny_model.hooks(fwd_hooks=hooks):
        tiny_model(batch.clean, attention_mask=batch.attention_mask)
    rows = torch.arange(len(data))
    write = seen["blocks.1.attn.hook_z"][rows, batch.last, 2] @ tiny_model.W_O[1, 2].detach()  # [b, d]
    if tiny_model.cfg.normalization_type == "LN":
        write = write - write.mean(-1, keepdim=True)
    W_U = tiny_model.W_U.detach()
    u = W_U[:, batch.correct[:, 0]].T - W_U[:, batch.wrong[:, 0]].T
    scale = seen["ln_final.hook_scale"][rows, batch.last].reshape(-1)
    expected = (write * u).sum(-1) / scale
    assert torch.allclose(result.last[:, result.nodes.index("a1.h2")], expected, atol=1e-4, rtol=1e-4)


def test_round_trip_and_refusal(tiny_model, tmp_path, monkeypatch):
    data = make_task("ioi", tiny_model.tokenizer, 3, seed=0)
    result = direct_logit_attribution(tiny_model, data, progress=False)
    loaded = DLAResult.load(result.save(tmp_path / "dla.safetensors"))
    assert loaded.nodes == result.nodes and torch.equal(loaded.last, result.last)
    assert torch.equal(loaded.per_position.isnan(), result.per_position.isnan())
    monkeypatch.setattr(tiny_model.cfg, "output_logits_soft_cap", 30.0)
    with pytest.raises(ParameterError, match="soft-caps its logits"):
        direct_logit_attribution(tiny_model, data, progress=False)


@pytest.mark.slow
def test_terms_sum_on_smollm2(smollm2):
    check_sums(smollm2, make_task("ioi", smollm2.tokenizer, 4, seed=1))
