"""Feature dashboards (dictionaries/dashboard.py, report/sections/dashboard.py, cli_dashboard.py): every
per-latent statistic against a naive computation from one cached forward pass on a tiny model, a
streamed pass equal to a one-shot one, the save/load round trip, the logit effects against the model's
own final norm and unembedding, the page in an offline headless chromium (search, sort, open a latent),
the CLI, device audit, and one GPU run."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny
import torch

from mechscope.dictionaries import Dictionary, DictionaryConfig, training_tokens
from mechscope.dictionaries.dashboard import (DashboardConfig, DashboardError, Dashboards, compute_dashboards,
                                              logit_effects, sample_keys)

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

HOOK = "blocks.1.hook_resid_pre"
CFG = DashboardConfig(top=6, samples=9, before=3, after=2, bins=16, log2_range=(-8.0, 2.0), logit_tokens=5)


def make_sae(model, architecture="relu", d_sae=40, seed=0, **kw):
    """A random dictionary whose encoder biases make latent i fire on about a share 0.7 ... 0.005 of
    the tokens of tiny.corpus() (latent 0 never)."""
    sae = Dictionary(DictionaryConfig(architecture, d_in=int(model.cfg.d_model), d_sae=d_sae, hook_point=HOOK, **kw))
    sae.init_weights(seed)
    tokens = training_tokens(model, tiny.corpus()[::7], length=16, progress=False)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n == HOOK)
    with torch.no_grad():
        pre = sae.pre_activations(cache[HOOK][:, 1:].reshape(-1, sae.config.d_in))
        q = torch.linspace(0.3, 0.995, d_sae, dtype=pre.dtype)
        sae.b_enc.copy_(-torch.stack([pre[:, i].quantile(q[i]) for i in range(d_sae)]))
        sae.b_enc[0] = -1e4
    return sae


@pytest.fixture(scope="module")
def case(tiny_model):
    tokens = training_tokens(tiny_model, tiny.corpus()[:80], length=16, progress=False)[:40]
    sae = make_sae(tiny_model)
    return tiny_model, sae, tokens


def naive(model, sae, tokens):
    """(latents [n, T, L] with BOS positions zeroed, keep [n, T], final residual [n, T, d]) of one cached pass."""
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in (HOOK, "ln_final.hook_in"))
    keep = tokens != model.tokenizer.bos_token_id
    f = sae.encode(cache[HOOK]).detach() * keep[..., None]
    return f.double(), keep, cache["ln_final.hook_in"].double()


def test_statistics_equal_a_naive_computation(case):
    model, sae, tokens = case
    dash = compute_dashboards(model, sae, tokens, config=CFG, batch_size=7, progress=False)
    f, keep, _ = naive(model, sae, tokens)
    n, T, L = f.shape
    t = dash.tensors
    assert dash.meta["n_tokens"] == int(keep.sum()) and dash.meta["skipped_bos"] == n
    counts = (f > 0).sum((0, 1))
    assert torch.equal(t["count"], counts) and counts[0] == 0 and (counts > 0).sum() > L // 2
    torch.testing.assert_close(dash.density, counts.double() / keep.sum())
    torch.testing.assert_close(t["total"], f.sum((0, 1)))
    flat = f.reshape(-1, L)
    keys = sample_keys(torch.arange(n * T)[:, None], torch.arange(L)[None, :])
    lo, hi = CFG.log2_range
    for i in range(L):
        fired = (flat[:, i] > 0).nonzero().flatten()
        vals = flat[fired, i]
        # histogram: log2 bins, clamped at the ends
        b = ((vals.log2() - lo) / (hi - lo) * CFG.bins).floor().clamp(0, CFG.bins - 1).long()
        assert torch.equal(t["hist"][i], torch.bincount(b, minlength=CFG.bins)), i
        # top contexts: the largest activations, their tokens and windows
        order = vals.argsort(descending=True, stable=True)[:CFG.top]   # ties: the earlier token first
        k = len(order)
        assert torch.equal(t["top_token"][i, :k], fired[order]) and (t["top_token"][i, k:] == -1).all()
        torch.testing.assert_close(t["top_value"][i, :k].double(), vals[order], rtol=1e-6, atol=0)
        for r in range(k):
            s, p = divmod(int(fired[order[r]]), T)
            want = [float(f[s, q, i]) if 0 <= q < T else 0.0 for q in range(p - CFG.before, p + CFG.after + 1)]
            np.testing.assert_allclose(t["top_window"][i, r].numpy(), want, rtol=1e-6)
        # samples: the firing tokens with the smallest keys (a uniform sample), with their activations
        pick = fired[(keys[fired, i] * (1 << 31) + fired).argsort()[:CFG.samples]]
        assert set(t["sample_token"][i][t["sample_token"][i] >= 0].tolist()) == set(pick.tolist())
        got = dict(zip(t["sample_token"][i].tolist(), t["sample_value"][i].tolist()))
        for g in pick.tolist():
            assert math.isclose(got[g], float(flat[g, i]), rel_tol=1e-6)
    # quantile examples: indices into the samples, increasing activation across the bands
    q = dash.quantile_indices(bands=3, per_band=2)
    for i in range(1, L):
        vals = [float(t["sample_value"][i, j]) for j in q[i].tolist() if j >= 0]
        assert vals == sorted(vals) and len(vals) == min(6, int((t["sample_token"][i] >= 0).sum()))
    assert (q[0] == -1).all()
    ctx = dash.contexts(1)[0]
    assert ctx["activation"] == float(t["top_value"][1, 0]) and len(ctx["tokens"]) == len(ctx["activations"])


def test_promoted_tokens_are_the_decoder_rows_through_the_frozen_final_norm(case):
    model, sae, tokens = case
    dash = compute_dashboards(model, sae, tokens, config=CFG, progress=False)
    _, keep, final = naive(model, sae, tokens)
    x = final[keep]
    layer_norm = model.cfg.normalization_type.upper().startswith("LN")
    centred = x - x.mean(-1, keepdim=True) if layer_norm else x
    r = (centred.pow(2).mean(-1) + model.cfg.eps).sqrt().mean()
    assert math.isclose(dash.meta["norm_scale"], float(r), rel_tol=1e-6)
    d = sae.W_dec.detach().double()
    d = d - d.mean(-1, keepdim=True) if layer_norm else d
    logits = d @ model.W_U.detach().double() / r
    for i in range(sae.config.d_sae):
        up, down = logits[i].topk(CFG.logit_tokens), (-logits[i]).topk(CFG.logit_tokens)
        assert torch.equal(dash.tensors["promoted_token"][i], up.indices)
        assert torch.equal(dash.tensors["suppressed_token"][i], down.indices)
        torch.testing.assert_close(dash.tensors["promoted_logit"][i].double(), up.values, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dash.tensors["suppressed_logit"][i].double(), -down.values, rtol=1e-5, atol=1e-6)
    # the formula is the model's own final norm and unembedding with the norm's scale frozen: for a
    # direction d whose P(d) is orthogonal to P(x), the scale r(x + e d) is r(x) to first order, so the
    # model's unembed(ln_final(x + e d)) - unembed(ln_final(x)) = e P(d) W_U / r(x) + O(e^2)
    with torch.no_grad():
        x0 = final[0, 5].float()
        px = x0 - x0.mean() if layer_norm else x0
        r0 = float(px.pow(2).mean().add(model.cfg.eps).sqrt())
        base = model.unembed(model.ln_final(x0[None, None]))[0, 0]
        for i in range(1, 4):
            d = sae.W_dec[i].detach()
            d = d - d.mean() if layer_norm else d
            d = d - (d @ px) / (px @ px) * px
            ids, vals, _, _ = logit_effects(model, d[None], r0, k=int(model.cfg.d_vocab))
            want = torch.zeros_like(base).scatter(0, ids[0], vals[0].to(base.dtype))
            e = 1e-2
            moved = model.unembed(model.ln_final((x0 + e * d)[None, None]))[0, 0]
            torch.testing.assert_close((moved - base) / e, want, rtol=0, atol=0.02 * float(want.abs().max()))


def test_streamed_equals_one_shot_and_save_load(case, tmp_path):
    model, sae, tokens = case
    one = compute_dashboards(model, sae, tokens, config=CFG, batch_size=len(tokens), progress=False)
    streamed = compute_dashboards(model, sae, tokens, config=CFG, batch_size=3, progress=False)
    for name, a in one.tensors.items():
        b = streamed.tensors[name]
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=name)
        else:
            assert torch.equal(a, b), name
    one.save(tmp_path / "d")
    back = Dashboards.load(tmp_path / "d")
    assert back.config == one.config and back.meta == one.meta and back.strings == one.strings
    assert torch.equal(back.tokens, one.tokens) and back.tensors.keys() == one.tensors.keys()
    assert all(torch.equal(back.tensors[k], v) for k, v in one.tensors.items())
    with pytest.raises(DashboardError, match="not an empty directory"):
        one.save(tmp_path / "d")
    (tmp_path / "d" / "dashboards.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(DashboardError, match="unreadable dashboards"):
        Dashboards.load(tmp_path / "d")
    (tmp_path / "d" / "dashboards.json").write_text('{"format": "something else"}')
    with pytest.raises(DashboardError, match="dashboards.json: not a mechscope dashboards"):
        Dashboards.load(tmp_path / "d")
    with pytest.raises(DashboardError, match="no dashboards.json"):
        Dashboards.load(tmp_path)


def test_topk_dictionary_and_bad_settings(case):
    model, _, tokens = case
    sae = make_sae(model, "topk", d_sae=32, k=4)
    dash = compute_dashboards(model, sae, tokens, config=CFG, batch_size=5, progress=False)
    f, keep, _ = naive(model, sae, tokens)
    assert torch.equal(dash.tensors["count"], (f > 0).sum((0, 1)))
    assert int(dash.tensors["count"].sum()) <= 4 * int(keep.sum())
    with pytest.raises(DashboardError, match="top must be a positive integer"):
        DashboardConfig(top=0)
    with pytest.raises(DashboardError, match="log2_range"):
        DashboardConfig(log2_range=(2.0, 1.0))
    with pytest.raises(DashboardError, match="tokens must be"):
        compute_dashboards(model, sae, torch.zeros(0, 4, dtype=torch.long), progress=False)


def test_dashboards_name_their_devices(case):
    from devicecheck import DeviceAudit

    model, sae, tokens = case
    with DeviceAudit() as audit:
        dash = compute_dashboards(model, sae, tokens, config=CFG, batch_size=6, progress=False)
        dash.section()
    assert not audit.leaks, audit.report()


def test_cli_writes_a_report_that_loads(tiny_model_dirs, tmp_path):
    import typer
    from typer.testing import CliRunner

    import mechscope
    from mechscope.dictionaries.cli_dashboard import register

    model = mechscope.load_model(str(tiny_model_dirs["llama"]), device="cpu")
    make_sae(model).save(tmp_path / "sae")
    text = tmp_path / "held.txt"
    text.write_text("\n".join(tiny.corpus()[100:160]))
    app = typer.Typer()
    register(app)

    @app.callback()
    def _root():
        pass

    runner = CliRunner()
    args = ["dashboard", "--model", str(tiny_model_dirs["llama"]), "--sae", str(tmp_path / "sae"), "--text", str(text),
            "--tokens", "200", "--length", "16", "--device", "cpu"]
    res = runner.invoke(app, args + ["--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r" / "report.html").is_file()
    dash = Dashboards.load(tmp_path / "r")
    assert dash.n_latents == 40 and dash.tokens.shape == (math.ceil(200 / 15), 16)
    bad = runner.invoke(app, ["dashboard", "--model", str(tiny_model_dirs["llama"]), "--sae", str(tmp_path / "none"),
                              "--out", str(tmp_path / "r2")])
    assert bad.exit_code == 2 and "no such dictionary directory" in bad.output
    again = runner.invoke(app, args + ["--out", str(tmp_path / "r")])
    assert again.exit_code == 2 and "--overwrite" in again.output


# ---- the page -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_page(tiny_model_dirs, tmp_path_factory):
    import mechscope
    from bench_dashboard import write_page

    model = mechscope.load_model(str(tiny_model_dirs["gpt2"]), device="cpu")
    tokens = training_tokens(model, tiny.corpus()[:120], length=24, progress=False)
    dash = compute_dashboards(model, make_sae(model, d_sae=120), tokens, progress=False)
    return write_page(tmp_path_factory.mktemp("dash") / "dashboard.html", dash), dash


def test_page_search_sort_and_open_offline(tiny_page):
    from bench_dashboard import open_dashboard, synthetic_dashboards, write_page
    from viewer_pages import browser

    path, dash = tiny_page
    t = dash.tensors
    L, N = dash.n_latents, 10
    alive = [i for i in range(L) if t["count"][i] > 0]
    density, peak = dash.density.numpy(), t["top_value"][:, 0].numpy()
    needle = dash.strings[int(dash.tokens[t["top_token"][5, 0] // dash.tokens.shape[1],
                                          t["top_token"][5, 0] % dash.tokens.shape[1]])].strip().lower()

    def has(i):  # the page's token search, from the dashboards
        T = dash.tokens.shape[1]
        shown = [int(dash.tokens[g // T, g % T]) for g in t["top_token"][i, :N].tolist() if g >= 0]
        shown += t["promoted_token"][i].tolist()
        return any(dash.strings[s].strip().lower() == needle for s in shown)

    def starts(i):
        T = dash.tokens.shape[1]
        shown = [int(dash.tokens[g // T, g % T]) for g in t["top_token"][i, :N].tolist() if g >= 0]
        shown += t["promoted_token"][i].tolist()
        return any(dash.strings[s].strip().lower().startswith(needle[:1]) for s in shown)

    with browser(1280, 900) as (context, blocked):
        errors: list[str] = []
        pg = open_dashboard(context, path, errors)
        first = sorted(alive, key=lambda i: (-density[i], i))[:50]
        assert pg.evaluate("MS.dashboard.shown()") == first
        assert pg.evaluate("MS.dashboard.sort('max')") == sorted(alive, key=lambda i: (-peak[i], i))[:50]
        assert pg.evaluate("MS.dashboard.sort('id')") == alive[:50]
        assert pg.evaluate("MS.dashboard.search('7')") == [7]
        assert pg.evaluate(f"MS.dashboard.search({needle!r})") == [i for i in range(L) if has(i)]
        assert pg.evaluate(f"MS.dashboard.search({needle[:1] + '*'!r})") == [i for i in range(L) if starts(i)]
        pg.fill("#db-search", "")
        pg.wait_for_function("MS.dashboard.state.query === ''")
        pg.check("#db-dead")
        assert int(pg.get_attribute("#db-count", "data-n")) == L
        pg.click("#db-table tbody tr:nth-child(3)")
        third = pg.evaluate("MS.dashboard.shown()[2]")
        assert pg.get_attribute("#db-latent", "data-latent") == str(third)
        n_top = int((t["top_token"][third, :N] >= 0).sum())
        assert pg.locator("#db-top .db-ctx").count() == n_top
        assert pg.locator("#db-top .db-ctx .db-max").count() == n_top
        assert pg.inner_text("#db-top .db-act >> nth=0") == pg.evaluate(f"MS.fmt({float(peak[third])})")
        n_q = int((dash.quantile_indices(4, 2)[third] >= 0).sum())
        assert pg.locator("#db-quantiles .db-ctx").count() == n_q
        assert pg.locator(".db-up tr").count() == 10 and pg.locator(".db-hist rect").count() >= 1
        assert math.isfinite(pg.evaluate("MS.dashboard.renderMs"))
        pg.close()
        # a synthetic dictionary of 4,096 latents: the index pages, the search and opening stay working
        big = write_page(path.parent / "big.html", synthetic_dashboards(4096, n_sequences=64, length=32))
        pg = open_dashboard(context, big, errors)
        assert len(pg.evaluate("MS.dashboard.shown()")) == 50
        pg.click("#db-next")
        assert pg.inner_text("#db-page").startswith("page 2 of")
        assert pg.evaluate("MS.dashboard.open(4095)") and pg.locator("#db-top .db-ctx").count() > 0
        pg.close()
    assert errors == [] and blocked == []


@pytest.mark.gpu
def test_dashboards_on_cuda(tiny_model_dirs):
    import mechscope

    import copy

    cpu_model = mechscope.load_model(str(tiny_model_dirs["llama"]), device="cpu")
    model = mechscope.load_model(str(tiny_model_dirs["llama"]), device="cuda")
    tokens = training_tokens(cpu_model, tiny.corpus()[:80], length=16, progress=False)[:40]
    cpu_sae = make_sae(cpu_model)  # the same dictionary on both devices
    sae = copy.deepcopy(cpu_sae).to("cuda")
    dash = compute_dashboards(model, sae, tokens, config=CFG, batch_size=7, progress=False)
    ref = compute_dashboards(cpu_model, cpu_sae, tokens, config=CFG, batch_size=40, progress=False)
    # the biases put latents' thresholds at quantiles of the data, so tokens right at a threshold may fire on
    # one device and not the other (float32 sums in another order): counts agree to 1% of the tokens
    n_tokens = int(dash.tensors["count"].new_tensor(tokens[:, 1:].numel()))
    assert (dash.tensors["count"] - ref.tensors["count"]).abs().max() <= 0.01 * n_tokens
    torch.testing.assert_close(dash.tensors["top_value"][:, 0], ref.tensors["top_value"][:, 0], rtol=1e-4, atol=1e-4)
    assert dash.section().data["n"] == 40
