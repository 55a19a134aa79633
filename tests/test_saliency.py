"""Token saliency (issue 7): input x gradient against finite differences, integrated gradients'
completeness, per-span aggregation."""

from __future__ import annotations

import pytest
import torch
from test_attribution import ioi_like

from mechscope.metrics import compute_metric, final_logits
from mechscope.schemas.saliency import aggregate_by_span, token_saliency


@pytest.fixture(scope="module")
def data(tiny_tokenizer):
    return ioi_like(tiny_tokenizer, 5, seed=8)


def metric_with_scaled_token(model, data, index, position, scale):
    """M on example `index` with the token embedding at `position` multiplied by `scale`."""
    batch = data.batch([index])

    def scaled(value, hook):
        value = value.clone()
        value[:, position] = value[:, position] * scale
        return value

    with torch.no_grad(), model.hooks(fwd_hooks=[("hook_embed", scaled)]):
        logits = model(batch.clean, attention_mask=batch.attention_mask)
    return float(compute_metric(data.metric, final_logits(logits, batch.last), batch)[0])


def test_input_x_gradient_equals_a_finite_difference(tiny_model, data):
    sal = token_saliency(tiny_model, data, "input_x_gradient", progress=False)
    assert [len(s) for s in sal] == [len(ex) for ex in data.examples]
    h = 1e-2
    for index in (0, 3):
        for position in (1, len(data.examples[index]) // 2, len(data.examples[index]) - 1):
            up = metric_with_scaled_token(tiny_model, data, index, position, 1 + h)
            down = metric_with_scaled_token(tiny_model, data, index, position, 1 - h)
            fd = (up - down) / (2 * h)
            assert float(sal[index][position]) == pytest.approx(fd, rel=2e-2, abs=2e-4), (index, position)
    assert max(float(s.abs().max()) for s in sal) > 1e-3


def test_integrated_gradients_is_complete(tiny_model, data):
    """Summed over tokens, IG from the counterfactual prompt approaches M(x) - M(x')."""
    sal = token_saliency(tiny_model, data, "integrated_gradients", baseline="counterfactual", steps=64,
                         progress=False)
    for index in range(len(data)):
        batch = data.batch([index])
        with torch.no_grad():
            clean = final_logits(tiny_model(batch.clean, attention_mask=batch.attention_mask), batch.last)
            cf = final_logits(tiny_model(batch.counterfactual, attention_mask=batch.attention_mask), batch.last)
        want = float(compute_metric(data.metric, clean, batch)[0] - compute_metric(data.metric, cf, batch)[0])
        assert float(sal[index].sum()) == pytest.approx(want, rel=2e-2, abs=1e-3)


def test_counterfactual_baseline_leaves_shared_tokens_at_zero(tiny_model, data):
    sal = token_saliency(tiny_model, data, "integrated_gradients", baseline="counterfactual", steps=8,
                         progress=False)
    for ex, s in zip(data.examples, sal):
        same = torch.tensor(ex.clean) == torch.tensor(ex.counterfactual)
        assert s[same].abs().max() == 0 and s[~same].abs().max() > 0


def test_saliency_per_span(tiny_model, data):
    sal = token_saliency(tiny_model, data, progress=False)
    per_span = aggregate_by_span(data, sal, reduce="abs")
    assert list(per_span) == list(data.schema.spans)
    assert all(v >= 0 for v in per_span.values()) and max(per_span.values()) > 0
    with pytest.raises(ValueError, match="unknown saliency method"):
        token_saliency(tiny_model, data, "lime", progress=False)
