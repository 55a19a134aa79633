"""Attribution to a spliced dictionary's latents and error (dictionaries/features.py): per position the
latents' scores plus the error's equal the hook point's own EAP score, computed here with plain hooks on
the unspliced model; the span sums; the spliced model equals the original; and no device leaks."""

from __future__ import annotations

import pytest
import torch
from devicecheck import DeviceAudit
from test_attribution import ioi_like
from test_dictionary_splice import sae_at

from mechscope.attribution.peap import batch_span_of
from mechscope.dictionaries.features import attribute_latents, faithfulness, token_scores, top_features
from mechscope.dictionaries.splice import splice
from mechscope.errors import ParameterError
from mechscope.metrics import compute_metric, final_logits

POINT = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def data(tiny_tokenizer):
    return ioi_like(tiny_tokenizer, 5, seed=3)


def first_batch(data, n=5):
    indices, batch = next(iter(data.batches(n)))
    return indices, batch


def hook_point_eap(model, batch, point, ablation):
    """(x − x_ref) · ∂M/∂x at `point` per [b, t], on the plain model."""
    got = {}

    def keep(act, hook):
        act.retain_grad() if act.requires_grad else act.requires_grad_(True)
        got["x"] = act
        return act

    with torch.enable_grad(), model.hooks(fwd_hooks=[(point, keep)]):
        final = final_logits(model(batch.clean, attention_mask=batch.attention_mask), batch.last)
        m = compute_metric("logit_diff", final, batch)
        (g,) = torch.autograd.grad(m.sum(), [got["x"]])
    x = got["x"].detach()
    if ablation == "zero":
        ref = torch.zeros_like(x)
    else:
        with torch.no_grad(), model.hooks(fwd_hooks=[(point, keep)]):
            model(batch.counterfactual, attention_mask=batch.attention_mask)
        ref = got["x"].detach()
    return ((x - ref) * g).sum(-1) * batch.attention_mask


@pytest.mark.parametrize("architecture", ["topk", "relu"])
@pytest.mark.parametrize("ablation", ["counterfactual", "zero"])
def test_latents_plus_error_equal_the_hook_points_eap(tiny_model, data, architecture, ablation):
    sae = sae_at(tiny_model, POINT, architecture, d_sae=48, seed=1)
    _, batch = first_batch(data)
    lat, err = token_scores(tiny_model, sae, batch, "logit_diff", ablation)[POINT]
    direct = hook_point_eap(tiny_model, batch, POINT, ablation)
    assert direct.abs().max() > 1e-3  # the test compares something
    assert lat.abs().sum() > 0 and (lat != 0).sum() < lat.numel()  # sparse latents took part
    torch.testing.assert_close(lat.sum(-1) + err, direct, atol=1e-4, rtol=1e-4)


def test_span_sums_and_keep_error_identity(tiny_model, data):
    sae = sae_at(tiny_model, POINT, "topk", d_sae=48, seed=2)
    scores = attribute_latents(tiny_model, sae, data, "counterfactual", progress=False)
    assert scores.latents[POINT].shape == (len(data.schema), 48)
    assert scores.error[POINT].shape == (len(data.schema),)
    # The same sums by hand from the token scores, span by span.
    total = torch.zeros(len(data.schema), dtype=torch.float64)
    for indices, batch in data.batches(2):
        direct = hook_point_eap(tiny_model, batch, POINT, "counterfactual")
        span_of = batch_span_of(data, indices, batch.clean.shape[1])
        for s in range(len(data.schema)):
            total[s] += direct[span_of == s].double().sum()
    torch.testing.assert_close(scores.node_total(), total / len(data), atol=1e-4, rtol=1e-4)
    # keep_error: the spliced model is the original.
    _, batch = first_batch(data)
    plain = tiny_model(batch.clean, attention_mask=batch.attention_mask)
    with splice(tiny_model, sae, keep_error=True):
        spliced = tiny_model(batch.clean, attention_mask=batch.attention_mask)
    torch.testing.assert_close(spliced, plain, atol=1e-4, rtol=1e-4)


def test_mean_ablation_scores_and_bad_input(tiny_model, data):
    sae = sae_at(tiny_model, POINT, "relu", d_sae=32, seed=0)
    scores = attribute_latents(tiny_model, sae, data, "mean", progress=False)
    assert torch.isfinite(scores.latents[POINT]).all() and scores.latents[POINT].abs().sum() > 0
    with pytest.raises(ParameterError, match="unknown ablation"):
        attribute_latents(tiny_model, sae, data, "resample", progress=False)
    with pytest.raises(ParameterError, match="'sum' only"):
        attribute_latents(tiny_model, sae, data, aggregation="avg", progress=False)


def test_no_device_leaks(tiny_model, data):
    sae = sae_at(tiny_model, POINT, "topk", d_sae=32, seed=0)
    with DeviceAudit() as audit:
        for ablation in ("counterfactual", "mean", "zero"):
            scores = attribute_latents(tiny_model, sae, data, ablation, progress=False)
            faithfulness(tiny_model, sae, data, {POINT: top_features(scores, 3)}, keep_error=False, ablation=ablation)
    assert not audit.leaks, audit.report()


def test_faithfulness_ends_at_clean_and_reference(tiny_model, data):
    from mechscope.behaviour import measure_behaviour
    from mechscope.dictionaries.features import feature_curve

    sae = sae_at(tiny_model, POINT, "topk", d_sae=48, seed=1)
    scores = attribute_latents(tiny_model, sae, data, "counterfactual", progress=False)
    b = measure_behaviour(tiny_model, data, progress=False)
    clean, cf = float(b.metric_clean.mean()), float(b.metric_counterfactual.mean())
    assert abs(clean - cf) > 1e-2
    n_all = scores.latents[POINT].numel()
    curve = feature_curve(tiny_model, sae, data, scores, [0, 5, n_all])
    assert curve[-1][0] == n_all and curve[-1][1] == pytest.approx(clean, abs=1e-4)
    # error kept, no latent: the latents' part alone is patched, so the metric moves off clean.
    assert abs(curve[0][1] - clean) > 1e-4
    none = torch.zeros_like(scores.latents[POINT], dtype=torch.bool)
    assert faithfulness(tiny_model, sae, data, {POINT: none}, keep_error=False) == pytest.approx(cf, abs=1e-4)
    top = top_features(scores, 5)
    assert int(top.sum()) == 5
    assert scores.latents[POINT].abs()[top].min() >= scores.latents[POINT].abs()[~top].max()
    with pytest.raises(ParameterError, match="bool tensor"):
        faithfulness(tiny_model, sae, data, {POINT: none[:, :3]})


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("ablation", ["counterfactual", "mean", "zero"])
def test_latent_attribution_and_curve_on_cuda_equal_the_cpu(arch, ablation, tiny_model_dirs, data):
    import copy

    import mechscope
    from mechscope.devices import model_device
    from mechscope.dictionaries.features import feature_curve

    cpu = mechscope.load_model(str(tiny_model_dirs[arch]), device="cpu")
    gpu = mechscope.load_model(str(tiny_model_dirs[arch]), device="cuda")
    sae = sae_at(cpu, POINT, "topk", d_sae=48, seed=1)
    sae_gpu = copy.deepcopy(sae).to("cuda")
    assert model_device(gpu).type == "cuda" and sae_gpu.device.type == "cuda"
    want = attribute_latents(cpu, sae, data, ablation, progress=False)
    got = attribute_latents(gpu, sae_gpu, data, ablation, progress=False)
    assert want.latents[POINT].abs().sum() > 0  # the comparison compares something
    torch.testing.assert_close(got.latents[POINT], want.latents[POINT], atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(got.error[POINT], want.error[POINT], atol=1e-4, rtol=1e-3)
    # The same nodes on both devices (the CPU ranking), so the curves compare the same circuits.
    ns = [0, 3, 10, want.latents[POINT].numel()]
    for keep_error in (True, False):
        a = feature_curve(cpu, sae, data, want, ns, keep_error=keep_error)
        b = feature_curve(gpu, sae_gpu, data, want, ns, keep_error=keep_error)
        assert [n for n, _ in b] == ns
        for (_, m_cpu), (_, m_gpu) in zip(a, b):
            assert m_gpu == pytest.approx(m_cpu, abs=1e-4, rel=1e-3)


def test_cli_sae_attribute_writes_scores_curve_and_report(tiny_model_dirs, data, tmp_path):
    import json

    from safetensors.torch import load_file
    from typer.testing import CliRunner

    import mechscope
    from mechscope.cli import app

    model = mechscope.load_model(str(tiny_model_dirs["llama"]), device="cpu")
    sae = sae_at(model, POINT, "topk", d_sae=48, seed=1)
    sae.save(tmp_path / "sae")
    data.save(tmp_path / "data.jsonl")
    out = tmp_path / "out"
    n_all = len(data.schema) * 48
    args = ["sae", "attribute", "--model", str(tiny_model_dirs["llama"]), "--sae", str(tmp_path / "sae"),
            "--data", str(tmp_path / "data.jsonl"), "--ns", f"0,3,{n_all}", "--error-ablated", "--top", "4",
            "--device", "cpu", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} >= {"report.html", "scores.safetensors", "scores.json", "curve.json",
                                               "curve.png"}
    want = attribute_latents(model, sae, data, "counterfactual", progress=False)
    saved = load_file(str(out / "scores.safetensors"))
    torch.testing.assert_close(saved["latents"], want.latents[POINT])
    torch.testing.assert_close(saved["error"], want.error[POINT])
    curves = json.loads((out / "curve.json").read_text())
    kept, ablated = curves["error kept"]["points"], curves["error ablated"]["points"]
    assert [p["n"] for p in kept] == [0, 3, n_all]
    assert kept[-1]["faithfulness"] == pytest.approx(1.0, abs=1e-4)  # every node and the error: the model
    assert ablated[0]["faithfulness"] == pytest.approx(0.0, abs=1e-4)  # nothing kept: the reference
    summary = json.loads((out / "scores.json").read_text())
    assert len(summary["top"]) == 4 and summary["hook_point"] == POINT
    assert abs(summary["top"][0]["score"]) == pytest.approx(float(want.latents[POINT].abs().max()), rel=1e-6)
    assert "Feature circuit" in (out / "report.html").read_text()
    # The same directory again is refused without --overwrite.
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "exists" in again.output
