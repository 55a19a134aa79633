"""Splicing dictionaries into the model (keep_error identity, x̂ replacement, latent and error hook
points), the metrics measured on the model (CE loss recovered against zero and mean ablation, KL)
checked against direct computations, and `mechscope sae train | eval | export`."""

from __future__ import annotations

import json

import pytest
import torch

from mechscope.dictionaries import Dictionary, DictionaryConfig, DictionaryError
from mechscope.dictionaries.measure import SpliceMetrics, ce_recovered, measure
from mechscope.dictionaries.splice import splice

RESID = "blocks.1.hook_resid_post"
MLP_IN, MLP_OUT = "blocks.0.ln2.hook_out", "blocks.0.hook_mlp_out"


def tokens_for(model, n=3, length=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    toks = torch.randint(3, model.cfg.d_vocab, (n, length), generator=gen)
    toks[:, 0] = model.tokenizer.bos_token_id
    return toks


def sae_at(model, point=RESID, architecture="topk", d_sae=48, seed=0, **kw):
    d = model.cfg.n_heads * model.cfg.d_head if point.endswith("hook_z") else model.cfg.d_model
    if architecture in ("topk", "batchtopk"):
        kw.setdefault("k", 5)
    config = DictionaryConfig(architecture, d, d_sae, point, **kw)
    sae = Dictionary(config).init_weights(seed)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
    return sae


def transcoder(model, architecture="transcoder"):
    config = DictionaryConfig(architecture, model.cfg.d_model, 40, MLP_IN, out_hook_point=MLP_OUT)
    sae = Dictionary(config).init_weights(1)
    if architecture == "skip_transcoder":
        with torch.no_grad():
            sae.W_skip.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    return sae


def perfect(model, point=RESID):
    """x̂ = ReLU(x) − ReLU(−x) = x exactly: 2d ReLU latents with encoder [I, −I] and decoder [I; −I]."""
    d = model.cfg.d_model
    sae = Dictionary(DictionaryConfig("relu", d, 2 * d, point))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    return sae


def read(model, toks, point):
    got = {}

    def keep(act, hook):
        got["x"] = act.detach().clone()
    with torch.no_grad(), model.hooks(fwd_hooks=[(point, keep)]):
        logits = model(toks)
    return logits, got["x"]


# ------------------------------------------------------------------------------------------------
# The splice
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["topk", "relu", "hook_z", "transcoder", "skip_transcoder"])
def test_keep_error_gives_the_original_model(tiny_model, kind):
    toks = tokens_for(tiny_model)
    if kind in ("transcoder", "skip_transcoder"):
        sae, written = transcoder(tiny_model, kind), MLP_OUT
    elif kind == "hook_z":
        sae, written = sae_at(tiny_model, "blocks.0.attn.hook_z"), "blocks.0.attn.hook_z"
    else:
        sae, written = sae_at(tiny_model, architecture=kind), RESID
    with torch.no_grad():
        clean = tiny_model(toks)
        with splice(tiny_model, sae) as spliced:
            got = {}
            hooks = [(f"{written}.sae.hook_{n}", lambda a, hook, n=n: got.__setitem__(n, a.clone()))
                     for n in ("latents", "error", "recons")]
            with tiny_model.hooks(fwd_hooks=hooks):
                out = tiny_model(toks)
        assert set(spliced.hook_dict) == {f"{written}.sae.hook_{n}" for n in ("latents", "error", "recons")}
    torch.testing.assert_close(out, clean, atol=2e-5, rtol=1e-5)
    # the latents are the dictionary's, the error is what the reconstruction misses, and it is not zero
    x = read(tiny_model, toks, MLP_IN if sae.config.is_transcoder else written)[1]
    y = read(tiny_model, toks, written)[1].reshape(*toks.shape, -1)
    x = x.reshape(*toks.shape, -1)
    torch.testing.assert_close(got["latents"], sae.encode(x))
    torch.testing.assert_close(got["recons"], sae(x).detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["recons"] + got["error"], y, atol=1e-5, rtol=1e-5)
    assert got["error"].abs().max() > 1e-2
    # the hook points are gone once the splice is closed
    assert f"{written}.sae.hook_latents" not in tiny_model.hook_dict


def test_gradients_reach_latents_and_error_and_match_the_original_upstream(tiny_model):
    toks = tokens_for(tiny_model)
    sae = sae_at(tiny_model)
    embed = "blocks.0.hook_resid_pre"

    def run(spliced_in: bool):
        kept = {}

        def hold(name):
            def hook(act, hook):
                act.retain_grad()
                kept[name] = act
                return act
            return hook
        names = [embed] + ([f"{RESID}.sae.hook_latents", f"{RESID}.sae.hook_error"] if spliced_in else [])
        with tiny_model.hooks(fwd_hooks=[(n, hold(n)) for n in names]):
            logits = tiny_model(toks)
            logits[:, -1].log_softmax(-1)[:, 7].sum().backward()
        return {n: t.grad for n, t in kept.items()}

    for p in sae.parameters():
        p.requires_grad_(False)
    original = run(False)
    with splice(tiny_model, sae):
        spliced = run(True)
    torch.testing.assert_close(spliced[embed], original[embed], atol=1e-5, rtol=1e-4)
    f_grad, e_grad = spliced[f"{RESID}.sae.hook_latents"], spliced[f"{RESID}.sae.hook_error"]
    assert f_grad.shape[-1] == sae.config.d_sae and e_grad.shape[-1] == tiny_model.cfg.d_model
    # the gradient on a latent is its decoder row against the error's (the downstream gradient)
    torch.testing.assert_close(f_grad, e_grad @ sae.W_dec.T, atol=1e-6, rtol=1e-4)


def test_without_error_the_activation_is_the_reconstruction_bos_untouched(tiny_model):
    toks = tokens_for(tiny_model)
    toks[1, 4] = tiny_model.tokenizer.bos_token_id  # a BOS inside a sequence is left alone too
    sae = sae_at(tiny_model)
    clean, x = read(tiny_model, toks, RESID)
    got = {}
    with torch.no_grad(), splice(tiny_model, sae, keep_error=False) as spliced:
        spliced.set_tokens(toks)
        with tiny_model.hooks(fwd_hooks=[("ln_final.hook_in", lambda a, hook: got.__setitem__("final", a))]):
            out = tiny_model(toks)
    bos = toks == tiny_model.tokenizer.bos_token_id
    with torch.no_grad():
        recons = sae(x)
    expected = torch.where(bos[..., None], x, recons)
    # the last block's output is what ln_final reads
    torch.testing.assert_close(got["final"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 0], clean[:, 0])
    assert (out[:, 1:] - clean[:, 1:]).abs().max() > 1e-3
    # without set_tokens the first position is taken as BOS
    with torch.no_grad(), splice(tiny_model, sae, keep_error=False):
        out2 = tiny_model(toks[:1])
    torch.testing.assert_close(out2[0, 0], clean[0, 0])


def test_splice_refuses_what_does_not_fit(tiny_model):
    d = tiny_model.cfg.d_model
    wide = Dictionary(DictionaryConfig("topk", d + 3, 32, RESID, k=2))
    with pytest.raises(DictionaryError, match=f"expects width {d + 3} at {RESID}.*has width {d}"):
        with splice(tiny_model, wide):
            pass
    unknown = Dictionary(DictionaryConfig("topk", d, 32, "blocks.9.hook_resid_post", k=2))
    listed = r"unknown hook point 'blocks.9.hook_resid_post'.*blocks.0.hook_resid_post"
    with pytest.raises(DictionaryError, match=listed):
        with splice(tiny_model, unknown):
            pass
    cross = Dictionary(DictionaryConfig("crosscoder", d, 32, "", hook_points=(RESID, "blocks.0.hook_resid_post")))
    with pytest.raises(DictionaryError, match="crosscoder cannot be spliced"):
        with splice(tiny_model, cross):
            pass
    with pytest.raises(DictionaryError, match="write the same hook point"):
        with splice(tiny_model, [sae_at(tiny_model), sae_at(tiny_model, seed=1)]):
            pass
    # nothing is left registered after a refusal
    assert not [n for n in tiny_model.hook_dict if ".sae." in n]


def test_two_dictionaries_spliced_at_once(tiny_model):
    toks = tokens_for(tiny_model)
    with torch.no_grad():
        clean = tiny_model(toks)
        with splice(tiny_model, [sae_at(tiny_model, "blocks.0.hook_resid_post"), sae_at(tiny_model),
                                 transcoder(tiny_model)]) as spliced:
            out = tiny_model(toks)
    assert len(spliced.hook_dict) == 9
    torch.testing.assert_close(out, clean, atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Metrics on the model
# ------------------------------------------------------------------------------------------------


def direct_metrics(model, sae, toks):
    """CE clean / spliced / zero / mean, KL and FVU computed plainly, one full batch at a time."""
    bos = toks == model.tokenizer.bos_token_id
    keep = ~bos[:, :-1]
    written = sae.config.out_hook_point if sae.config.is_transcoder else sae.config.hook_point
    clean, y = read(model, toks, written)
    x = read(model, toks, sae.config.hook_point)[1] if sae.config.is_transcoder else y
    mean = y[~bos].mean(0)

    def ce(logits):
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), toks[:, 1:], reduction="none")
        return float(nll[keep].mean())

    def run(value):
        def hook(act, hook):
            return torch.where(bos[..., None], act, value(act))
        with torch.no_grad(), model.hooks(fwd_hooks=[(written, hook)]):
            return model(toks)

    with torch.no_grad():
        recons = sae(x)
    spliced = run(lambda a: recons)
    kl = torch.nn.functional.kl_div(spliced[:, :-1].log_softmax(-1), clean[:, :-1].log_softmax(-1),
                                    log_target=True, reduction="none").sum(-1)[keep].mean()
    target = y[~bos].double()
    fvu = ((target - recons[~bos].double()) ** 2).sum() / ((target - target.mean(0)) ** 2).sum()
    return {"ce_clean": ce(clean), "ce_spliced": ce(spliced), "ce_zero_ablated": ce(run(torch.zeros_like)),
            "ce_mean_ablated": ce(run(lambda a: mean.expand_as(a))), "kl": float(kl), "fvu": float(fvu),
            "l0": float((sae.encode(x)[~bos] != 0).sum(-1).double().mean())}


@pytest.mark.parametrize("kind", ["topk", "transcoder"])
def test_measure_matches_a_direct_computation(tiny_model, kind):
    toks = tokens_for(tiny_model, n=5, length=10, seed=3)
    sae = transcoder(tiny_model) if kind == "transcoder" else sae_at(tiny_model)
    got = measure(tiny_model, sae, toks, batch_size=2)  # batches of 2, 2, 1: sums over batches
    want = direct_metrics(tiny_model, sae, toks)
    for key, value in want.items():
        assert getattr(got, key) == pytest.approx(value, rel=1e-4, abs=1e-5), key
    assert got.ce_recovered_zero == pytest.approx(ce_recovered(want["ce_zero_ablated"], want["ce_spliced"],
                                                               want["ce_clean"]), rel=1e-3)
    assert got.ce_recovered_mean == pytest.approx(
        (want["ce_mean_ablated"] - want["ce_spliced"]) / (want["ce_mean_ablated"] - want["ce_clean"]), rel=1e-3)
    assert got.predictions == 5 * 8 and got.sequences == 5  # predictions made at BOS left out
    assert sum(got.density_histogram) + got.dead == sae.config.d_sae


def test_a_perfect_dictionary_recovers_everything_a_zero_one_nothing(tiny_model, tmp_path):
    toks = tokens_for(tiny_model, n=4, length=10, seed=5)
    good = measure(tiny_model, perfect(tiny_model), toks)
    assert good.ce_recovered_zero == pytest.approx(1, abs=1e-4)
    assert good.ce_recovered_mean == pytest.approx(1, abs=1e-4)
    assert good.kl == pytest.approx(0, abs=1e-6) and good.fvu == pytest.approx(0, abs=1e-8)
    zero = Dictionary(DictionaryConfig("topk", tiny_model.cfg.d_model, 16, RESID, k=2))  # all weights zero: x̂ = 0
    bad = measure(tiny_model, zero, toks)
    assert bad.ce_recovered_zero == pytest.approx(0, abs=1e-6) and bad.ce_spliced == pytest.approx(bad.ce_zero_ablated)
    assert bad.kl > 0 and bad.l0 == 0 and bad.dead == 16
    # a dictionary that always writes the held-out mean recovers nothing against mean ablation
    direct = direct_metrics(tiny_model, zero, toks)
    _, y = read(tiny_model, toks, RESID)
    with torch.no_grad():
        zero.b_dec.copy_(y[toks != tiny_model.tokenizer.bos_token_id].mean(0))
    flat = measure(tiny_model, zero, toks)
    assert flat.ce_recovered_mean == pytest.approx(0, abs=1e-4)
    assert direct["ce_clean"] == pytest.approx(flat.ce_clean, rel=1e-5)
    # with the error term kept the spliced model is the original
    kept = measure(tiny_model, sae_at(tiny_model), toks, keep_error=True)
    assert kept.kl == pytest.approx(0, abs=1e-7) and kept.ce_spliced == pytest.approx(kept.ce_clean, abs=1e-5)
    assert kept.ce_recovered_zero == pytest.approx(1, abs=1e-4) and kept.ce_recovered_mean == pytest.approx(1, abs=1e-4)
    # the result saves as JSON and reads back
    path = good.save(tmp_path / "m.json")
    assert SpliceMetrics(**json.loads(path.read_text())) == good


def test_a_crosscoder_is_measured_from_the_clean_activations_of_all_its_hook_points(tiny_model):
    points = ("blocks.0.hook_resid_post", RESID)
    d = tiny_model.cfg.d_model
    cross = Dictionary(DictionaryConfig("crosscoder", d, 40, "", hook_points=points, activation="topk", k=4))
    cross.init_weights(2)
    toks = tokens_for(tiny_model, n=5, length=10, seed=4)
    got = measure(tiny_model, cross, toks, batch_size=2)
    bos = toks == tiny_model.tokenizer.bos_token_id
    keep = ~bos[:, :-1]
    clean, a0 = read(tiny_model, toks, points[0])
    _, a1 = read(tiny_model, toks, points[1])
    stacked = torch.stack([a0, a1], -2)
    with torch.no_grad():
        recons = cross(stacked)  # [n, pos, 2, d], from the clean activations of both points

    def run(values):
        hooks = [(p, (lambda v: lambda act, hook: torch.where(bos[..., None], act, v))(v)) for p, v in zip(points, values)]
        with torch.no_grad(), tiny_model.hooks(fwd_hooks=hooks):
            return tiny_model(toks)

    def ce(logits):
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), toks[:, 1:], reduction="none")
        return float(nll[keep].mean())

    spliced = run([recons[..., 0, :], recons[..., 1, :]])
    means = [a[~bos].mean(0).expand_as(a) for a in (a0, a1)]
    assert got.ce_clean == pytest.approx(ce(clean), rel=1e-5)
    assert got.ce_spliced == pytest.approx(ce(spliced), rel=1e-4)
    assert got.ce_zero_ablated == pytest.approx(ce(run([torch.zeros_like(a0)] * 2)), rel=1e-4)
    assert got.ce_mean_ablated == pytest.approx(ce(run(means)), rel=1e-4)
    target = stacked[~bos].double()
    fvu = ((target - recons[~bos].double()) ** 2).sum() / ((target - target.mean(0)) ** 2).sum()
    assert got.fvu == pytest.approx(float(fvu), rel=1e-4) and got.l0 == pytest.approx(4)
    assert got.hook_point == ",".join(points) and got.kl > 0
    kept = measure(tiny_model, cross, toks, keep_error=True)
    assert kept.kl == pytest.approx(0, abs=1e-6) and kept.ce_spliced == pytest.approx(kept.ce_clean, abs=1e-5)


def test_measure_refuses_bad_tokens(tiny_model):
    sae = sae_at(tiny_model)
    with pytest.raises(DictionaryError, match="at least one sequence of two tokens"):
        measure(tiny_model, sae, torch.zeros((0, 5), dtype=torch.long))
    with pytest.raises(DictionaryError, match="tensor of token ids"):
        measure(tiny_model, sae, torch.zeros((2, 5)))
    only_bos = torch.full((2, 4), tiny_model.tokenizer.bos_token_id)
    with pytest.raises(DictionaryError, match="no position other than BOS"):
        measure(tiny_model, sae, only_bos)


def test_splice_and_measure_name_their_devices(tiny_model):
    from devicecheck import DeviceAudit

    toks = tokens_for(tiny_model)
    sae = sae_at(tiny_model)
    with DeviceAudit() as audit:
        with torch.no_grad(), splice(tiny_model, sae, keep_error=False):
            tiny_model(toks)
        with torch.no_grad(), splice(tiny_model, transcoder(tiny_model)):
            tiny_model(toks)
        measure(tiny_model, sae, toks)
    assert not audit.leaks, audit.report()


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def text_file(tmp_path):
    import tiny

    path = tmp_path / "text.txt"
    path.write_text(" ".join(tiny.corpus()))
    return path


def test_cli_train_eval_export(tiny_model_dirs, text_file, tmp_path):
    from typer.testing import CliRunner

    from mechscope.cli import app
    from mechscope.dictionaries import load_any

    runner = CliRunner()
    model = str(tiny_model_dirs["llama"])
    out = tmp_path / "sae"
    result = runner.invoke(app, ["sae", "train", "--model", model, "--hook", RESID, "--k", "4", "--expansion", "2",
                                 "--text", str(text_file), "--tokens", "2048", "--batch-size", "128", "--length", "32",
                                 "--lr", "1e-3", "--held-out", "4", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "dictionary.safetensors", "metrics.json",
                                                     "report", "training.json"]
    assert not (tmp_path / "sae.checkpoint").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["l0"] == pytest.approx(4) and metrics["hook_point"] == RESID
    training = json.loads((out / "training.json").read_text())
    assert training["steps"] == 16 and training["tokens"] == 16 * 128 and training["tokens_per_second"] > 0
    assert "CE recovered" in (out / "report" / "report.html").read_text()
    sae = Dictionary.load(out)
    assert sae.config.d_sae == 2 * 64 and sae.config.extra["training"]["tokens"] == 2048

    report = tmp_path / "eval"
    result = runner.invoke(app, ["sae", "eval", "--model", model, "--sae", str(out), "--text", str(text_file),
                                 "--length", "32", "--count", "3", "--out", str(report), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    first = json.loads((report / "metrics.json").read_text())
    assert first["predictions"] == 3 * 30 and (report / "report.html").is_file()

    exported = tmp_path / "saelens"
    result = runner.invoke(app, ["sae", "export", "--sae", str(out), "--to", "saelens", "--out", str(exported)])
    assert result.exit_code == 0, result.output
    assert (exported / "cfg.json").is_file()
    x = torch.randn(5, 64)
    torch.testing.assert_close(load_any(exported)(x), sae(x), atol=1e-5, rtol=1e-5)
    again = tmp_path / "eval2"
    result = runner.invoke(app, ["sae", "eval", "--model", model, "--sae", str(exported), "--text", str(text_file),
                                 "--length", "32", "--count", "3", "--out", str(again), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    second = json.loads((again / "metrics.json").read_text())
    for key in ("ce_spliced", "ce_recovered_zero", "kl", "fvu", "l0"):
        assert second[key] == pytest.approx(first[key], rel=1e-4, abs=1e-6), key


def test_cli_trains_a_transcoder(tiny_model_dirs, text_file, tmp_path):
    from typer.testing import CliRunner

    from mechscope.cli import app

    out = tmp_path / "tc"
    result = CliRunner().invoke(app, ["sae", "train", "--model", str(tiny_model_dirs["gpt2"]), "--hook", MLP_IN,
                                      "--target", MLP_OUT, "--architecture", "skip_transcoder", "--text",
                                      str(text_file), "--tokens", "1024", "--batch-size", "128", "--length", "32",
                                      "--held-out", "2", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    sae = Dictionary.load(out)
    assert (sae.config.hook_point, sae.config.out_hook_point) == (MLP_IN, MLP_OUT)
    assert json.loads((out / "metrics.json").read_text())["hook_point"] == MLP_OUT


def test_cli_train_resumes_an_interrupted_run(tiny_model_dirs, text_file, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mechscope.cli import app
    from mechscope.dictionaries import training

    model = str(tiny_model_dirs["gpt2"])
    args = ["sae", "train", "--model", model, "--hook", "blocks.0.hook_resid_post", "--k", "4", "--expansion", "2",
            "--text", str(text_file), "--tokens", "2560", "--batch-size", "128", "--length", "32",
            "--held-out", "2", "--device", "cpu", "--seed", "3"]
    runner = CliRunner()
    assert runner.invoke(app, args + ["--out", str(tmp_path / "whole")]).exit_code == 0
    real = training.save_checkpoint
    calls = []

    def interrupting(*a, **kw):
        real(*a, **kw)
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
    monkeypatch.setattr(training, "save_checkpoint", interrupting)
    stopped = runner.invoke(app, args + ["--out", str(tmp_path / "cut")])
    assert stopped.exit_code == 130 and not (tmp_path / "cut").exists()
    assert (tmp_path / "cut.checkpoint" / "training.json").is_file()
    monkeypatch.setattr(training, "save_checkpoint", real)
    done = runner.invoke(app, args + ["--out", str(tmp_path / "cut"), "--resume"])
    assert done.exit_code == 0, done.output
    whole, cut = Dictionary.load(tmp_path / "whole"), Dictionary.load(tmp_path / "cut")
    torch.testing.assert_close(cut.W_dec, whole.W_dec, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_train_and_measure_on_cuda(tiny_model_dirs):
    import mechscope
    from mechscope.dictionaries import ActivationBuffer, train

    model = mechscope.load_model(str(tiny_model_dirs["llama"]), device="cuda")
    toks = tokens_for(model, n=16, length=32)
    sae = Dictionary(DictionaryConfig("topk", model.cfg.d_model, 128, RESID, k=4), device="cuda").init_weights(0)
    before = measure(model, sae, toks[-4:])
    buffer = ActivationBuffer(model, RESID, toks[:-4], batch_size=64, loop=True, progress=False)
    train(sae, buffer, steps=30, lr=1e-3, progress=False)
    after = measure(model, sae, toks[-4:])
    assert sae.W_dec.device.type == "cuda" and after.fvu < before.fvu
    with torch.no_grad():
        clean = model(toks.cuda())
    with torch.no_grad(), splice(model, sae):
        torch.testing.assert_close(model(toks.cuda()), clean, atol=1e-4, rtol=1e-4)
