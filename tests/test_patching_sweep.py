"""Activation patching sweeps (docs/method.md §9): the batched sweep against the one-forward-per-patch
loop, identities that hold by construction, attribution patching against an independent autograd
derivative, the result file, errors, and the `mechscope patch sweep` command."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from mechscope.cli import app
from mechscope.patching import (
    COMPONENTS, PatchingError, PatchResult, PatchResultError, attribution_sweep, naive_sweep, patch_sweep, spearman,
)
from mechscope.patching.sweep import last_logits, resample_partners
from mechscope.metrics import compute_metric, final_logits
from mechscope.tasks import make_task

TOL = 1e-5


@pytest.fixture(scope="module")
def ioi(tiny_model):
    return make_task("ioi", tiny_model.tokenizer, 2, 0)


@pytest.fixture(scope="module")
def aligned(tiny_model):
    """Examples of one layout (length and span starts), for the resample reference and token positions."""
    ds = make_task("ioi", tiny_model.tokenizer, 40, 1)
    groups: dict = {}
    for i, ex in enumerate(ds.examples):
        groups.setdefault((len(ex), tuple(ex.span_starts)), []).append(i)
    best = max(groups.values(), key=len)
    assert len(best) >= 2
    return ds.subset(best[:3])


CASES = [("noising", "counterfactual"), ("denoising", "counterfactual"), ("noising", "zero"), ("noising", "mean")]


@pytest.mark.parametrize("component", list(COMPONENTS))
def test_batched_sweep_equals_the_naive_loop(tiny_model, ioi, aligned, component):
    for direction, reference in CASES + [("noising", "resample")]:
        data = aligned if reference == "resample" or (component == "pattern" and reference == "mean") else ioi
        positions = "token" if component == "pattern" and reference == "mean" else "span"
        kw = dict(component=component, direction=direction, reference=reference, positions=positions)
        fast = patch_sweep(tiny_model, data, patch_batch=5, progress=False, **kw)
        slow = naive_sweep(tiny_model, data, progress=False, **kw)
        assert fast.values.shape == slow.values.shape
        assert torch.allclose(fast.raw, slow.raw, atol=TOL, rtol=0), (direction, reference)
        assert torch.allclose(fast.metric_clean, slow.metric_clean, atol=TOL)
        assert torch.allclose(fast.values, slow.values, atol=1e-4, rtol=1e-4)


def test_token_positions_equal_the_naive_loop(tiny_model, aligned):
    fast = patch_sweep(tiny_model, aligned, "resid_pre", positions="token", reference="mean", progress=False)
    slow = naive_sweep(tiny_model, aligned, "resid_pre", positions="token", reference="mean", progress=False)
    assert fast.values.shape[-1] == len(aligned.examples[0])
    assert torch.allclose(fast.raw, slow.raw, atol=TOL, rtol=0)


def test_a_run_from_any_layer_without_a_patch_is_the_clean_run(tiny_model, ioi):
    b = ioi.batch()
    with torch.no_grad():
        full = final_logits(tiny_model(b.clean, attention_mask=b.attention_mask), b.last)
        cache = tiny_model.run_with_cache(b.clean, attention_mask=b.attention_mask)[1]
        for l in range(tiny_model.cfg.n_layers):
            calls = []
            hooks = [(f"blocks.{k}.hook_resid_post", lambda x, hook=None: calls.append(1)) for k in range(l)]
            got = last_logits(tiny_model, cache[f"blocks.{l}.hook_resid_pre"], b.attention_mask, b.last, hooks, l)
            assert torch.allclose(got, full, atol=TOL), l
            assert not calls, "blocks before the start layer must not run"
    m = compute_metric("logit_diff", full, b)
    res = patch_sweep(tiny_model, ioi, "resid_post", progress=False)
    assert torch.allclose(res.metric_clean, m, atol=TOL)


def test_an_empty_patch_leaves_the_clean_metric(tiny_model, ioi):
    # the reference is the clean run itself: every patch replaces an activation by its own value
    res = patch_sweep(tiny_model, ioi, "z_pos", direction="denoising", progress=False)
    same = patch_sweep(tiny_model, ioi.subset([0]), "mlp_out", progress=False)
    assert same.raw.shape[0] == 1
    swapped = ioi._with([type(ex)(**{**ex.__dict__, "counterfactual": list(ex.clean)}) for ex in ioi.examples])
    nothing = patch_sweep(tiny_model, swapped, "resid_pre", progress=False)
    assert torch.allclose(nothing.raw, nothing.metric_clean[:, None, None].expand_as(nothing.raw), atol=TOL)
    assert res.values.isfinite().all()


def test_last_layer_residual_at_the_final_position_is_the_counterfactual(tiny_model, ioi):
    last = tiny_model.cfg.n_layers - 1
    for direction in ("noising", "denoising"):
        res = patch_sweep(tiny_model, ioi, "resid_post", direction=direction, layers=[last], progress=False)
        end = res.labels[1].index("end")  # the final span is the last token
        assert all(ex.span_bounds()[-1] == (len(ex) - 1, len(ex)) for ex in ioi.examples)
        want = res.metric_counterfactual if direction == "noising" else res.metric_clean
        assert torch.allclose(res.raw[:, 0, end], want, atol=TOL)
        assert torch.allclose(res.values[:, 0, end], torch.ones(len(ioi)), atol=1e-4)


def test_the_whole_input_embedding_gives_the_full_effect(tiny_model, ioi):
    whole = ioi.single_span()
    noise = patch_sweep(tiny_model, whole, "resid_pre", layers=[0], progress=False)
    denoise = patch_sweep(tiny_model, whole, "resid_pre", direction="denoising", layers=[0], progress=False)
    assert torch.allclose(noise.raw[:, 0, 0], noise.metric_counterfactual, atol=TOL)
    assert torch.allclose(denoise.raw[:, 0, 0], denoise.metric_clean, atol=TOL)
    assert torch.allclose(noise.values, torch.ones_like(noise.values), atol=1e-4)
    assert torch.allclose(denoise.values, torch.ones_like(denoise.values), atol=1e-4)
    # the patch of nothing (the zero-effect end): normalised 0
    assert torch.allclose(noise.mean, torch.ones_like(noise.mean), atol=1e-4)


@pytest.mark.parametrize("component,cell", [("z_pos", (1, 2, 5)), ("resid_pre", (1, 3)), ("pattern", (0, 1)),
                                            ("v", (1, 1))])
def test_attribution_patching_is_the_derivative_along_the_patch(tiny_model, ioi, component, cell):
    est = attribution_sweep(tiny_model, ioi, component)
    exact = patch_sweep(tiny_model, ioi, component, progress=False)
    assert est.values.shape == exact.values.shape
    l = cell[0]
    name = f"blocks.{l}.{COMPONENTS[component][0]}"
    heads = list(range(est.values.shape[2])) if est.values.dim() > 3 else None
    for e, ex in enumerate(ioi.examples):
        one = ioi.batch([e])
        cf = tiny_model.run_with_cache(one.counterfactual)[1][name]
        alpha = torch.zeros((), requires_grad=True)
        spans = ex.span_of_positions()

        def patch(x, hook=None):
            sel = torch.zeros_like(x, dtype=torch.bool)
            if component == "z_pos":
                tokens = [t for t, s in enumerate(spans) if s == cell[2]]
                sel[0, tokens, heads[cell[1]]] = True
            elif component == "resid_pre":
                sel[0, [t for t, s in enumerate(spans) if s == cell[1]]] = True
            elif component == "pattern":
                sel[0, cell[1]] = True
            else:
                sel[0, :, cell[1]] = True
            return x + alpha * (cf - x).detach() * sel

        logits = final_logits(tiny_model.run_with_hooks(one.clean, fwd_hooks=[(name, patch)]), one.last)
        (d,) = torch.autograd.grad(compute_metric("logit_diff", logits, one)[0], alpha)
        got = est.raw[(e,) + cell] - est.metric_clean[e]
        assert abs(float(got) - float(d)) <= 1e-4 * max(1.0, abs(float(d))), (e, float(got), float(d))
    assert spearman(exact.values, est.values) > 0.3


def test_spearman():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, a * 10) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([0.0, 0.0, 5.0])) == pytest.approx(1.0)


def test_result_round_trip_and_frame(tiny_model, ioi, tmp_path):
    res = patch_sweep(tiny_model, ioi, "z_pos", progress=False)
    path = res.save(tmp_path / "r.safetensors")
    back = PatchResult.load(path)
    assert torch.equal(back.values, res.values) and torch.equal(back.raw, res.raw)
    assert back.axes == ("layer", "head", "position") and back.labels == res.labels and back.meta == res.meta
    assert torch.allclose(back.mean, res.mean)
    frame = res.to_frame()
    assert len(frame) == res.values.numel() and {"layer", "head", "position", "value", "raw"} <= set(frame.columns)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(PatchResultError, match="not a mechscope patching result"):
        PatchResult.load(tmp_path / "junk.safetensors")
    with pytest.raises(PatchResultError, match="no such patching result file"):
        PatchResult.load(tmp_path / "missing.safetensors")


def test_bad_requests_fail_before_any_work(tiny_model, ioi):
    cases = [
        (dict(component="zz"), "unknown component 'zz'; choose one of resid_pre"),
        (dict(direction="sideways"), "unknown direction 'sideways'"),
        (dict(reference="median"), "unknown reference 'median'; choose one of counterfactual, mean, zero, resample"),
        (dict(layers=[9]), "layer 9 is out of range"),
        (dict(component="k", heads=[7]), "head 7 is out of range"),
        (dict(component="mlp_out", heads=[0]), "has no heads"),
        (dict(direction="denoising", reference="zero"), "reference 'zero' is for noising"),
        (dict(reference="resample"), "no other example of the same length"),
    ]
    if len({len(ex) for ex in ioi.examples}) > 1:
        cases.append((dict(positions="token"), "positions='token' needs examples of one length"))
    for kw, message in cases:
        with pytest.raises(PatchingError, match=message.replace("(", r"\(")):
            patch_sweep(tiny_model, ioi, **{"component": "z_pos", **kw}, progress=False)


def test_resample_reference_shorter_than_the_dataset(tiny_model, aligned):
    with pytest.raises(PatchingError, match=f"the resample reference has 1 examples, fewer than the dataset's {len(aligned)}"):
        patch_sweep(tiny_model, aligned, "z", reference="resample", reference_data=aligned.subset([0]), progress=False)
    partners = resample_partners(aligned, seed=3)
    assert sorted(partners) == list(range(len(aligned))) and all(p != i for i, p in enumerate(partners))


def test_cli_patch_sweep(tiny_model_dirs, tmp_path):
    out = tmp_path / "sweep"
    result = CliRunner().invoke(app, ["patch", "sweep", "--task", "ioi", "--model", str(tiny_model_dirs["gpt2"]),
                                      "--component", "z", "--n", "3", "--estimate", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {"result.safetensors", "result.json", "heatmap.png", "report.html",
                                                "estimate.safetensors", "estimate.png"}
    res = PatchResult.load(out / "result.safetensors")
    assert res.axes == ("layer", "head") and res.values.shape[0] == 3
    summary = json.loads((out / "result.json").read_text())
    assert summary["component"] == "z" and -1 <= summary["spearman_exact_estimate"] <= 1
    page = (out / "report.html").read_text()
    assert 'id="patching-heatmap"' in page and "patching-which" in page
    bad = CliRunner().invoke(app, ["patch", "sweep", "--task", "ioi", "--model", str(tiny_model_dirs["gpt2"]),
                                   "--reference", "median", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "unknown reference 'median'" in bad.output
    assert not (tmp_path / "x").exists()
