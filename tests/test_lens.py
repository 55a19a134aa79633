"""The logit lens and the tuned lens (mechscope.lens) on the tiny random models: exactness at the last
layer, identity initialisation, training, files, text sources, interruption and the CLI."""

from __future__ import annotations

import json
import os

import pytest
import torch
from typer.testing import CliRunner

from mechscope import lens
from mechscope.cli import app
from mechscope.lens import text as lens_text
from mechscope.lens.logit_lens import LensError
from mechscope.lens.text import TextError

runner = CliRunner()


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def llama(tiny_model_dirs):
    import mechscope

    return mechscope.load_model(str(tiny_model_dirs["llama"]), device="cpu")


def corpus_text() -> str:
    import tiny

    return "\n".join(tiny.corpus())


def exact_kl(final_logits: torch.Tensor, lens_logits: torch.Tensor) -> float:
    """KL(final || lens) of one position, in float64, term by term."""
    p = torch.softmax(final_logits.double(), -1)
    logp = torch.log_softmax(final_logits.double(), -1)
    logq = torch.log_softmax(lens_logits.double(), -1)
    return float(sum(p[i] * (logp[i] - logq[i]) for i in range(len(p))))


# --- the logit lens -------------------------------------------------------------------------------


def test_logit_lens_at_the_last_layer_is_the_models_output(tiny_model):
    tokens = lens.tokenize_text([corpus_text()], tiny_model.tokenizer, 16, 3)
    resid = lens.residuals(tiny_model, tokens)
    assert resid.shape[0] == tiny_model.cfg.n_layers + 1
    logits = tiny_model(tokens)
    torch.testing.assert_close(lens.decode(tiny_model, resid[-1]), logits, rtol=0, atol=1e-5)
    result = lens.evaluate_lenses(tiny_model, tokens, progress=False)
    assert result.streams == ["embed"] + [str(l) for l in range(tiny_model.cfg.n_layers)]
    assert abs(result.kl["logit"][-1]) < 1e-6
    assert all(v > 1e-4 for v in result.kl["logit"][:-1])  # the earlier streams are not the output
    assert result.n_positions == 3 * 15  # BOS left out


def test_mean_kl_matches_a_term_by_term_computation(llama):
    tokens = lens.tokenize_text([corpus_text()], llama.tokenizer, 6, 2)
    tuned = lens.TunedLens.for_model(llama)
    with torch.no_grad():
        for i in range(tuned.n_layers):  # a lens that is not the identity
            tuned.A[i].normal_(0, 0.05, generator=torch.Generator().manual_seed(i))
            tuned.b[i].normal_(0, 0.5, generator=torch.Generator().manual_seed(10 + i))
    result = lens.evaluate_lenses(llama, tokens, tuned, batch_size=1, progress=False)
    with torch.no_grad():
        resid = lens.residuals(llama, tokens)
        final = llama(tokens)
        for s in range(len(result.streams)):
            for name in ("logit", "tuned"):
                kls = []
                for row in range(2):
                    for pos in range(1, 6):
                        h = resid[s, row, pos]
                        if name == "tuned" and s < tuned.n_layers:
                            h = h + tuned.A[s] @ h + tuned.b[s]
                        kls.append(exact_kl(final[row, pos], lens.decode(llama, h[None])[0]))
                assert result.kl[name][s] == pytest.approx(sum(kls) / len(kls), rel=1e-4, abs=1e-6)


def test_identity_tuned_lens_is_the_logit_lens(tiny_model):
    tokens = lens.tokenize_text([corpus_text()], tiny_model.tokenizer, 16, 2)
    identity = lens.TunedLens.for_model(tiny_model)
    result = lens.evaluate_lenses(tiny_model, tokens, identity, progress=False)
    assert result.kl["tuned"] == result.kl["logit"]
    grid = lens.lens_predictions(tiny_model, "When Mary and John went to the store", identity, k=3)
    assert grid.top["tuned"] == grid.top["logit"]
    assert len(grid.top["logit"]) == tiny_model.cfg.n_layers + 1
    assert len(grid.top["logit"][0]) == len(grid.tokens) and grid.tokens[0] == tiny_model.tokenizer.bos_token
    # The last stream's top prediction is the model's own.
    last = tiny_model(tiny_model.to_tokens(grid.prompt))[0].argmax(-1).tolist()
    assert [tiny_model.tokenizer.decode([t]) for t in last] == [cell[0][0] for cell in grid.top["logit"][-1]]


# --- training --------------------------------------------------------------------------------------


def test_training_lowers_held_out_kl(llama):
    train = lens_text.sample_tokens(llama, 32, 24, seed=0, progress=False)
    held_out = lens_text.sample_tokens(llama, 32, 8, seed=1, progress=False)
    tuned, log = lens.train_tuned_lens(llama, train, n_tokens=3072, tokens_per_step=64, lr=1e-2, seed=0,
                                       progress=False)
    assert log.steps == 48 and log.tokens == 3072 and len(log.losses) == 48
    result = lens.evaluate_lenses(llama, held_out, tuned, progress=False)
    for s, logit, tuned_kl in zip(result.streams[:-1], result.kl["logit"], result.kl["tuned"]):
        assert tuned_kl < 0.9 * logit, (s, logit, tuned_kl)
    assert result.kl["tuned"][-1] == result.kl["logit"][-1]
    # Same seed, same lens.
    again, _ = lens.train_tuned_lens(llama, train, n_tokens=3072, tokens_per_step=64, lr=1e-2, seed=0, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(tuned.A, again.A))


def test_model_parameters_keep_their_grad_flags(llama):
    before = [p.requires_grad for p in llama.parameters()]
    tokens = lens.tokenize_text([corpus_text()], llama.tokenizer, 16, 2)
    lens.train_tuned_lens(llama, tokens, n_tokens=32, tokens_per_step=16, progress=False)
    assert [p.requires_grad for p in llama.parameters()] == before
    assert all(p.grad is None for p in llama.parameters())


def test_save_load_round_trip(llama, tmp_path):
    tokens = lens.tokenize_text([corpus_text()], llama.tokenizer, 16, 4)
    tuned, _ = lens.train_tuned_lens(llama, tokens, n_tokens=64, tokens_per_step=32, seed=3, out=tmp_path / "l",
                                     progress=False, text={"source": "corpus"})
    assert sorted(os.listdir(tmp_path)) == ["l"]
    loaded = lens.TunedLens.load(tmp_path / "l", llama)
    assert all(torch.equal(a, b) for a, b in zip(tuned.A, loaded.A))
    assert all(torch.equal(a, b) for a, b in zip(tuned.b, loaded.b))
    config = json.loads((tmp_path / "l" / "lens.json").read_text())
    assert config["d_model"] == 64 and config["n_layers"] == 2 and config["seed"] == 3
    assert config["training_tokens"] == 64 and config["text"] == {"source": "corpus"}
    assert config["model"] == llama.mechscope_name
    a = lens.evaluate_lenses(llama, tokens, tuned, progress=False)
    b = lens.evaluate_lenses(llama, tokens, loaded, progress=False)
    assert a.kl == b.kl
    a.save(tmp_path / "kl.json")
    assert lens.LensEvaluation.load(tmp_path / "kl.json") == a
    a.save_csv(tmp_path / "kl.csv")
    lines = (tmp_path / "kl.csv").read_text().splitlines()
    assert lines[0] == "layer,kl_logit,kl_tuned" and len(lines) == 4
    grid = lens.lens_predictions(llama, "Alice and Bob", loaded, k=2)
    grid.save(tmp_path / "p.json")
    assert lens.LensPredictions.load(tmp_path / "p.json") == grid


def test_a_lens_of_another_shape_is_refused(llama, tmp_path):
    other = lens.TunedLens(32, 3, {"model": "elsewhere", "d_vocab": 545})
    other.save(tmp_path / "other")
    with pytest.raises(LensError, match="trained for a model with d_model 32, 3 layers"):
        lens.TunedLens.load(tmp_path / "other", llama)
    tokens = lens.tokenize_text([corpus_text()], llama.tokenizer, 16, 1)
    with pytest.raises(LensError, match="d_model 32, 3 layers"):
        lens.evaluate_lenses(llama, tokens, other, progress=False)
    (tmp_path / "bad").mkdir()
    with pytest.raises(LensError, match="no lens.json"):
        lens.TunedLens.load(tmp_path / "bad")


def test_interrupted_training_leaves_no_lens(llama, tmp_path):
    tokens = lens.tokenize_text([corpus_text()], llama.tokenizer, 16, 4)
    seen = []

    def stop(step, loss):
        seen.append(step)
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        lens.train_tuned_lens(llama, tokens, n_tokens=160, tokens_per_step=16, out=tmp_path / "lens",
                              callback=stop, progress=False)
    assert seen == [0, 1, 2]
    assert os.listdir(tmp_path) == []


# --- text ------------------------------------------------------------------------------------------


def test_text_sources(llama, tmp_path):
    tok = llama.tokenizer
    docs = ["When Mary and John went to the store, John gave a drink to Mary.",
            "The war lasted from the year 1732 to the year 1737."] * 5
    (tmp_path / "a.txt").write_text(docs[0])
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n")
    import datasets

    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "ds"))
    assert lens.read_text(tmp_path / "a.txt") == [docs[0]]
    assert lens.read_text(tmp_path / "a.jsonl") == docs
    assert lens.read_text(tmp_path / "ds") == docs
    from_jsonl = lens.load_text(tmp_path / "a.jsonl", tok, 8)
    from_ds = lens.load_text(tmp_path / "ds", tok, 8)
    assert torch.equal(from_jsonl, from_ds)
    assert (from_jsonl[:, 0] == tok.bos_token_id).all() and from_jsonl.shape[1] == 8
    # Documents are joined with EOS; every piece after BOS is the next 7 tokens of that stream.
    stream = []
    for i, d in enumerate(docs):
        stream += ([tok.eos_token_id] if i else []) + tok(d, add_special_tokens=False)["input_ids"]
    assert from_jsonl[:, 1:].reshape(-1).tolist() == stream[: from_jsonl.shape[0] * 7]
    assert lens.load_text(tmp_path / "a.jsonl", tok, 8, count=2).shape == (2, 8)


def test_bad_text_is_named(llama, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(TextError, match="empty.txt: holds no text"):
        lens.read_text(tmp_path / "empty.txt")
    (tmp_path / "short.txt").write_text("Mary")
    with pytest.raises(TextError, match=r"short.txt: too short: \d+ tokens, fewer than the 127"):
        lens.load_text(tmp_path / "short.txt", llama.tokenizer, 128)
    (tmp_path / "b.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(TextError, match="b.jsonl, line 2: missing field 'text'"):
        lens.read_text(tmp_path / "b.jsonl")
    with pytest.raises(TextError, match="nope.txt: no such text file"):
        lens.read_text(tmp_path / "nope.txt")
    (tmp_path / "dir").mkdir()
    with pytest.raises(TextError, match="not a `datasets` directory"):
        lens.read_text(tmp_path / "dir")


def test_sampled_text_is_deterministic_and_cached(llama, monkeypatch):
    first = lens.sampled_text(llama, length=12, count=3, seed=5, progress=False)
    assert first.shape == (3, 12) and (first[:, 0] == llama.tokenizer.bos_token_id).all()
    path = lens_text.sample_cache_path(llama, 5, 12, 3)
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == [path.name]
    assert torch.equal(first, lens_text.sample_tokens(llama, 12, 3, 5, progress=False))  # the same draw again

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled again")

    monkeypatch.setattr(lens_text, "sample_tokens", no_sampling)
    assert torch.equal(lens.sampled_text(llama, length=12, count=3, seed=5, progress=False), first)
    monkeypatch.undo()
    monkeypatch.setenv("MECHSCOPE_CACHE", str(path.parent.parent.parent / "cache2"))
    other = lens.sampled_text(llama, length=12, count=3, seed=6, progress=False)
    assert not torch.equal(other, first)
    assert lens_text.sample_cache_path(llama, 6, 12, 3) != lens_text.sample_cache_path(llama, 5, 12, 3)
    assert lens_text.sample_cache_path(llama, 5, 12, 4) != lens_text.sample_cache_path(llama, 5, 12, 3)


# --- the CLI ---------------------------------------------------------------------------------------


def test_cli_train_and_eval(tiny_model_dirs, tmp_path):
    model = str(tiny_model_dirs["llama"])
    (tmp_path / "corpus.txt").write_text(corpus_text())
    result = runner.invoke(app, ["lens", "train", "--model", model, "--text", str(tmp_path / "corpus.txt"),
                                 "--tokens", "128", "--tokens-per-step", "32", "--length", "24", "--out",
                                 str(tmp_path / "lens"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "128 training positions in 4 steps" in " ".join(result.output.split())
    result = runner.invoke(app, ["lens", "eval", "--model", model, "--lens", str(tmp_path / "lens"), "--count", "2",
                                 "--length", "16", "--prompt", "Alice and Bob", "--k", "3", "--out",
                                 str(tmp_path / "report"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path / "report")) == ["kl.csv", "kl.json", "kl.png", "predictions.json", "report.html"]
    evaluation = lens.LensEvaluation.load(tmp_path / "report" / "kl.json")
    assert set(evaluation.kl) == {"logit", "tuned"} and evaluation.text["seed"] == 1
    page = (tmp_path / "report" / "report.html").read_text()
    assert 'id="lens-kl"' in page and 'id="lens-grid"' in page and "Tuned lens trained on 128 positions" in page
    assert (tmp_path / "report" / "kl.png").read_bytes()[:4] == b"\x89PNG"
