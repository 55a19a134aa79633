"""Sparse dictionaries (mechscope.dictionaries): the Dictionary object, its architectures, files,
training and metrics, on synthetic activations and tiny random models."""

from __future__ import annotations

import json

import pytest
import torch

from mechscope.dictionaries import ARCHITECTURES, Dictionary, DictionaryConfig, DictionaryError

D_IN, D_SAE = 8, 32


def make_config(architecture: str, d_in: int = D_IN, d_sae: int = D_SAE, **kw) -> DictionaryConfig:
    """A small config of each architecture with the fields it needs."""
    base = dict(architecture=architecture, d_in=d_in, d_sae=d_sae, hook_point="blocks.0.hook_resid_post")
    if architecture in ("topk", "batchtopk", "matryoshka"):
        base["k"] = 4
    if architecture == "matryoshka":
        base["prefixes"] = (d_sae // 4, d_sae // 2, d_sae)
    if architecture in ("transcoder", "skip_transcoder"):
        base.update(hook_point="blocks.0.ln2.hook_normalized", out_hook_point="blocks.0.hook_mlp_out")
    if architecture == "crosscoder":
        base.update(hook_points=("blocks.0.hook_resid_post", "blocks.1.hook_resid_post"))
    base.update(kw)
    return DictionaryConfig(**base)


def sample_input(config: DictionaryConfig, n: int = 16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (n, config.n_hooks, config.d_in) if config.architecture == "crosscoder" else (n, config.d_in)
    return torch.randn(shape, generator=gen)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_shapes_and_round_trip(architecture, tmp_path):
    config = make_config(architecture)
    sae = Dictionary(config).init_weights(seed=1)
    x = sample_input(config)
    f = sae.encode(x)
    assert f.shape == (16, D_SAE)
    out = sae(x)
    assert out.shape == x.shape
    saved = sae.save(tmp_path / "d")
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "dictionary.safetensors"]
    again = Dictionary.load(saved)
    assert again.config == config
    torch.testing.assert_close(again(x), out, rtol=0, atol=0)


def test_topk_keeps_k_per_token():
    sae = Dictionary(make_config("topk")).init_weights(0)
    f = sae.encode(sample_input(sae.config, 50))
    assert ((f > 0).sum(-1) <= 4).all() and ((f > 0).sum(-1) == 4).float().mean() > 0.5


def test_relu_is_the_relu_of_the_affine_map():
    sae = Dictionary(make_config("relu")).init_weights(3)
    x = sample_input(sae.config)
    expected = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).relu()
    torch.testing.assert_close(sae.encode(x), expected)
    torch.testing.assert_close(sae(x), expected @ sae.W_dec + sae.b_dec)


def test_bad_configs_and_files(tmp_path):
    with pytest.raises(DictionaryError, match="unknown architecture"):
        make_config("dense")
    with pytest.raises(DictionaryError, match="k between 1 and d_sae"):
        make_config("topk", k=0)
    with pytest.raises(DictionaryError, match="prefixes"):
        make_config("matryoshka", prefixes=(4, 2, D_SAE))
    sae = Dictionary(make_config("relu")).init_weights(0)
    with pytest.raises(DictionaryError, match="width 5 do not fit .*reads width 8"):
        sae.encode(torch.zeros(3, 5))
    path = sae.save(tmp_path / "d")
    with pytest.raises(DictionaryError, match="already exists"):
        sae.save(path)
    sae.save(path, overwrite=True)
    # corrupt weights
    (path / "dictionary.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(DictionaryError, match=f"{path / 'dictionary.safetensors'}.*not a readable safetensors"):
        Dictionary.load(path)
    # foreign config
    other = tmp_path / "foreign"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"hidden_size": 8}))
    (other / "dictionary.safetensors").write_bytes(b"")
    with pytest.raises(DictionaryError, match=f"{other / 'config.json'}: not a mechscope dictionary"):
        Dictionary.load(other)
    # a SAELens-looking directory is pointed at the interop module
    lens = tmp_path / "saelens"
    lens.mkdir()
    (lens / "cfg.json").write_text("{}")
    with pytest.raises(DictionaryError, match="SAELens or sparsify"):
        Dictionary.load(lens)
    with pytest.raises(DictionaryError, match="no such dictionary"):
        Dictionary.load(tmp_path / "missing")
    # a config whose shapes disagree with the tensors
    good = Dictionary(make_config("relu")).init_weights(0).save(tmp_path / "good")
    data = json.loads((good / "config.json").read_text())
    data["config"]["d_sae"] = 16
    (good / "config.json").write_text(json.dumps(data))
    with pytest.raises(DictionaryError, match="W_enc has shape"):
        Dictionary.load(good)


def test_width_that_does_not_fit_the_model(tiny_model_dirs):
    import mechscope

    model = mechscope.load_model(str(tiny_model_dirs["gpt2"]), device="cpu")
    d = model.cfg.d_model
    Dictionary(make_config("relu", d_in=d)).check_model(model)
    with pytest.raises(DictionaryError, match=f"expects width {d + 1} at blocks.0.hook_resid_post.*width {d}"):
        Dictionary(make_config("relu", d_in=d + 1)).check_model(model)
    with pytest.raises(DictionaryError, match="unknown hook point 'blocks.9.hook_resid_post'"):
        Dictionary(make_config("relu", d_in=d, hook_point="blocks.9.hook_resid_post")).check_model(model)


# -- training on a tiny model's activations ---------------------------------------------------------
RESID0, RESID1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
MLP_IN, MLP_OUT = "blocks.0.ln2.hook_out", "blocks.0.hook_mlp_out"


@pytest.fixture(scope="module")
def activations(tiny_model_dirs):
    """{hook point: [n_tokens, d_model]} of the tiny GPT-2 over the tiny corpus, BOS and padding left out;
    the rows of every hook point are the same tokens."""
    import sys
    from pathlib import Path

    import mechscope

    sys.path.insert(0, str(Path(__file__).parent))
    import tiny

    model = mechscope.load_model(str(tiny_model_dirs["gpt2"]), device="cpu")
    texts = tiny.corpus()[::3]
    points = [RESID0, RESID1, MLP_IN, MLP_OUT]
    out = {p: [] for p in points}
    tok = model.tokenizer
    for start in range(0, len(texts), 32):
        enc = tok(texts[start:start + 32], return_tensors="pt", padding=True)
        ids = torch.cat([torch.full((enc.input_ids.shape[0], 1), tok.bos_token_id), enc.input_ids], 1)
        mask = torch.cat([torch.zeros(ids.shape[0], 1, dtype=torch.bool), enc.attention_mask.bool()], 1)
        with torch.no_grad():
            attention = torch.cat([torch.ones(ids.shape[0], 1, dtype=torch.long), enc.attention_mask], 1)
            _, cache = model.run_with_cache(ids, attention_mask=attention, names_filter=lambda n: n in points)
        for p in points:
            out[p].append(cache[p][mask])
    acts = {p: torch.cat(v) for p, v in out.items()}
    perm = torch.randperm(acts[RESID0].shape[0], generator=torch.Generator().manual_seed(0))
    return {p: a[perm] for p, a in acts.items()}


def stream(acts, architecture, batch=256, held_out=512, repeat=True):
    """Batches for the architecture (tensors, (input, target) pairs or stacked hook points), cycling
    through the training tokens; and the held-out batch."""
    if architecture in ("transcoder", "skip_transcoder"):
        data = (acts[MLP_IN], acts[MLP_OUT])
    elif architecture == "crosscoder":
        data = (torch.stack([acts[RESID0], acts[RESID1]], 1),)
    else:
        data = (acts[RESID1],)
    train_part = [d[held_out:] for d in data]
    held = [d[:held_out] for d in data]
    n = train_part[0].shape[0]

    def batches():
        while True:
            for s in range(0, n - batch + 1, batch):
                items = [d[s:s + batch] for d in train_part]
                yield tuple(items) if len(items) == 2 else items[0]
            if not repeat:
                return
    held_batch = tuple(held) if len(held) == 2 else held[0]
    return batches(), held_batch


TRAIN_SETTINGS = {  # per architecture: config overrides and learning rate
    "relu": (dict(l1_coefficient=0.1), 3e-3),
    "topk": (dict(k=8), 3e-3),
    "batchtopk": (dict(k=8), 3e-3),
    "jumprelu": (dict(l0_coefficient=0.01, threshold_init=0.01, jumprelu_bandwidth=0.05), 3e-3),
    "gated": (dict(l1_coefficient=0.1), 3e-3),
    "matryoshka": (dict(k=8, prefixes=(16, 64, 128)), 3e-3),
    "transcoder": (dict(activation="topk", k=8), 3e-3),
    "skip_transcoder": (dict(activation="topk", k=8), 3e-3),
    "crosscoder": (dict(l1_coefficient=0.1), 3e-3),
}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_each_architecture_lowers_fvu_on_a_tiny_model(architecture, activations, tmp_path):
    from mechscope.dictionaries import evaluate, train

    d = activations[RESID0].shape[1]
    overrides, lr = TRAIN_SETTINGS[architecture]
    config = make_config(architecture, d_in=d, d_sae=128, **overrides)
    sae = Dictionary(config).init_weights(seed=0)
    batches, held = stream(activations, architecture)
    before = evaluate(sae, [held])
    result = train(sae, batches, steps=150, lr=lr, progress=False, dead_after=2000)
    after = evaluate(sae, [held])
    assert result.steps == 150 and result.tokens == 150 * 256
    assert after.fvu() < 0.5 * before.fvu() and after.fvu() < 0.5, (before.fvu(), after.fvu())
    assert 0 < after.l0() < 64  # sparse: under half the latents per token
    if config.sparsity in ("topk", "batchtopk"):
        assert after.l0() < 3 * config.k
    if config.decoder_norm == "unit":
        torch.testing.assert_close(sae.W_dec.reshape(128, -1).norm(dim=-1), torch.ones(128), atol=1e-5, rtol=0)
    x = held if not isinstance(held, tuple) else held[0]
    again = Dictionary.load(sae.save(tmp_path / "trained"))
    torch.testing.assert_close(again(x), sae(x), rtol=0, atol=0)
    assert again.config == config


def test_batchtopk_selects_over_the_batch_and_estimates_a_threshold(activations):
    from mechscope.dictionaries import evaluate, train

    d = activations[RESID1].shape[1]
    sae = Dictionary(make_config("batchtopk", d_in=d, d_sae=128, k=8)).init_weights(1)
    x = activations[RESID1][:100]
    sae.train()
    f = sae.encode(x).detach()
    per_token = (f > 0).sum(-1)
    assert int(per_token.sum()) == 8 * 100  # k·batch over the batch ...
    assert int(per_token.max()) > 8 or int(per_token.min()) < 8  # ... not k per token
    pre = sae.pre_activations(x)
    kept = pre.detach().reshape(-1).topk(800).values
    assert float(f[f > 0].min()) == pytest.approx(float(kept.min().detach()))
    sae.eval()
    assert float(sae.threshold) == 0  # none estimated yet: per-token TopK at inference
    assert ((sae.encode(x) > 0).sum(-1) <= 8).all()
    batches, held = stream(activations, "batchtopk")
    train(sae, batches, steps=100, lr=3e-3, progress=False)
    assert float(sae.threshold) > 0
    f = sae.encode(held)
    torch.testing.assert_close(f, sae.pre_activations(held) * (sae.pre_activations(held) > sae.threshold))
    assert 8 / 3 < evaluate(sae, [held]).l0() < 3 * 8  # the threshold keeps L0 near k


def test_jumprelu_straight_through_gradients_match_finite_differences():
    from mechscope.dictionaries.dictionary import jumprelu, step

    eps = 0.1
    gen = torch.Generator().manual_seed(0)
    z = torch.rand(400, 3, generator=gen, dtype=torch.float64) * 2  # in [0, 2)
    theta = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64, requires_grad=True)
    step(z, theta, eps).sum().backward()
    # the θ-gradient of Σ H(z − θ) is the central finite difference of the count of z above θ
    count = lambda t: (z > t).sum(0).to(torch.float64)  # noqa: E731
    with torch.no_grad():
        fd = (count(theta + eps / 2) - count(theta - eps / 2)) / eps
    torch.testing.assert_close(theta.grad, fd)
    # and of Σ z·H(z − θ): −(θ/ε)·#window, close to the finite difference −Σ_window z / ε
    theta.grad = None
    zz = z.clone().requires_grad_(True)
    jumprelu(zz, theta, eps).sum().backward()
    with torch.no_grad():
        total = lambda t: (z * (z > t)).sum(0)  # noqa: E731
        fd = (total(theta + eps / 2) - total(theta - eps / 2)) / eps
    torch.testing.assert_close(theta.grad, fd, rtol=eps, atol=0)
    torch.testing.assert_close(zz.grad, (z > theta.detach()).to(torch.float64))


def test_unit_norm_decoder_and_the_gradient_projection():
    from mechscope.dictionaries.training import normalize_decoder, remove_parallel_gradient

    sae = Dictionary(make_config("topk")).init_weights(0)
    x = sample_input(sae.config, 64)
    (sae(x) - x).pow(2).sum().backward()
    remove_parallel_gradient(sae)
    along = (sae.W_dec.grad * sae.W_dec.detach()).sum(-1).abs()
    assert float(along.max()) < 1e-6 * float(sae.W_dec.grad.norm(dim=-1).max())
    with torch.no_grad():
        sae.W_dec.mul_(3)
    normalize_decoder(sae)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE))


def test_relu_decoder_norms_are_left_free_and_penalised():
    from mechscope.dictionaries import train
    from mechscope.dictionaries.architectures import loss

    sae = Dictionary(make_config("relu", l1_coefficient=0.5)).init_weights(0)
    x = sample_input(sae.config, 64)
    parts = loss(sae, x)
    f = sae.encode(x)
    torch.testing.assert_close(parts.parts["l1"], 0.5 * (f * sae.W_dec.norm(dim=-1)).sum(-1).mean())
    train(sae, iter([sample_input(sae.config, 64, seed=s) for s in range(20)]), steps=20, lr=1e-2, progress=False)
    assert not torch.allclose(sae.W_dec.norm(dim=-1), torch.full((D_SAE,), 0.1))


def test_gated_magnitude_path_shares_the_gate_weights():
    sae = Dictionary(make_config("gated")).init_weights(0)
    with torch.no_grad():
        sae.r_mag.fill_(0.5)
        sae.b_mag.fill_(0.1)
        sae.b_gate.fill_(-0.2)
    x = sample_input(sae.config, 32)
    centred = x - sae.b_dec
    gate = (centred @ sae.W_enc + sae.b_gate) > 0
    mag = (centred @ sae.W_enc * torch.exp(torch.tensor(0.5)) + 0.1).relu()
    torch.testing.assert_close(sae.encode(x), gate * mag)


def test_auxk_feeds_dead_latents_gradient():
    from mechscope.dictionaries.architectures import loss

    sae = Dictionary(make_config("topk", k=2)).init_weights(0)
    x = sample_input(sae.config, 16)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[20:] = True
    parts = loss(sae, x, dead=dead)
    assert "auxk" in parts.parts
    parts.loss.backward()
    silent = (sae.encode(x) != 0).sum(0) == 0
    assert (sae.W_enc.grad[:, silent & dead].abs().sum(0) > 0).any()
    sae.zero_grad()
    loss(sae, x).loss.backward()  # no dead latents: no gradient reaches the silent ones
    assert sae.W_enc.grad[:, silent].abs().sum() == 0


class Interrupt:
    """A deterministic stream that raises KeyboardInterrupt when asked for batch `at`."""

    def __init__(self, config, at=None):
        self.config, self.at = config, at

    def __iter__(self):
        i = 0
        while True:
            if i == self.at:
                raise KeyboardInterrupt
            yield sample_input(self.config, 32, seed=100 + i)
            i += 1


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_interrupted_training_keeps_the_last_checkpoint_and_resumes_exactly(architecture, tmp_path):
    from mechscope.dictionaries import train

    config = make_config(architecture)
    kw = dict(steps=10, lr=1e-2, checkpoint_every=3, progress=False, dead_after=64)
    full = Dictionary(config).init_weights(0)
    train(full, Interrupt(config), **kw)
    sae = Dictionary(config).init_weights(0)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        train(sae, Interrupt(config, at=7), checkpoint=ckpt, **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no partial file beside it
    state = json.loads((ckpt / "training.json").read_text())
    assert state["step"] == 6 and state["tokens"] == 6 * 32
    assert Dictionary.load(ckpt).config == config
    with pytest.raises(DictionaryError, match="already there"):
        train(Dictionary(config).init_weights(0), Interrupt(config), checkpoint=ckpt, **kw)
    again = Dictionary(config).init_weights(5)  # whatever it starts from, resuming restores it
    result = train(again, Interrupt(config), checkpoint=ckpt, resume=True, **kw)
    assert result.steps == 10
    for name, value in full.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], value, rtol=0, atol=0, msg=name)
    assert json.loads((ckpt / "training.json").read_text())["step"] == 10
    other = make_config(architecture, d_sae=16, **({"prefixes": (4, 16)} if architecture == "matryoshka" else {}))
    with pytest.raises(DictionaryError, match=f"{ckpt}: the checkpoint is of another dictionary .*d_sae"):
        train(Dictionary(other), Interrupt(other), checkpoint=ckpt, resume=True, **kw)


def test_training_bad_input():
    from mechscope.dictionaries import train

    sae = Dictionary(make_config("relu")).init_weights(0)
    with pytest.raises(DictionaryError, match="activation stream is empty"):
        train(sae, iter([]), steps=5, progress=False)
    with pytest.raises(DictionaryError, match="width 3 do not fit .*reads width 8"):
        train(sae, iter([torch.zeros(4, 3)]), steps=5, progress=False)
    tc = Dictionary(make_config("transcoder")).init_weights(0)
    with pytest.raises(DictionaryError, match="trains on \\(input, target\\) pairs"):
        train(tc, iter([torch.zeros(4, D_IN)]), steps=5, progress=False)
    with pytest.raises(DictionaryError, match="targets of shape \\(4, 5\\)"):
        train(tc, iter([(torch.zeros(4, D_IN), torch.zeros(4, 5))]), steps=5, progress=False)
    with pytest.warns(UserWarning, match="ended after 2 of 5 steps"):
        result = train(sae, iter([sample_input(sae.config), sample_input(sae.config, seed=1)]), steps=5,
                       progress=False)
    assert result.steps == 2


# -- metrics ----------------------------------------------------------------------------------------
def test_metrics_against_direct_computation():
    from mechscope.dictionaries.metrics import LatentStats, dead_latents, density_histogram, fire_counts, fvu, l0

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=gen) + 3
    x_hat = x + 0.3 * torch.randn(50, 6, generator=gen)
    expected = sum(float(((x[i] - x_hat[i]) ** 2).sum()) for i in range(50)) / \
        sum(float(((x[i] - x.mean(0)) ** 2).sum()) for i in range(50))
    assert float(fvu(x, x_hat)) == pytest.approx(expected, rel=1e-6)
    assert float(fvu(x, x)) == 0
    assert float(fvu(x, x.mean(0).expand_as(x))) == pytest.approx(1.0)
    f = torch.zeros(50, 10)
    f[:, 0] = 1
    f[::5, 3] = 2.0
    f[0, 7] = 0.5
    assert float(l0(f)) == pytest.approx(1 + 10 / 50 + 1 / 50)
    assert dead_latents(f).tolist() == [i not in (0, 3, 7) for i in range(10)]
    edges, hist, n_dead = density_histogram(fire_counts(f), 50, bins=8, low=-4)
    assert n_dead == 7 and int(hist.sum()) == 3 and hist[-1] == 1  # density 1 in the last bin
    stats = LatentStats()
    for s in range(0, 50, 7):  # streamed in uneven batches: the same as one tensor
        stats.update(x[s:s + 7], x_hat[s:s + 7], f[s:s + 7])
    assert stats.fvu() == pytest.approx(float(fvu(x, x_hat)), rel=1e-9)
    assert stats.l0() == pytest.approx(float(l0(f)))
    assert stats.dead().tolist() == dead_latents(f).tolist()
    with pytest.raises(DictionaryError, match="empty activation stream"):
        LatentStats().fvu()


def test_training_and_metrics_name_their_devices(activations):
    from devicecheck import DeviceAudit

    from mechscope.dictionaries import evaluate, train

    d = activations[RESID0].shape[1]
    for architecture in ("batchtopk", "jumprelu", "gated", "crosscoder", "skip_transcoder", "matryoshka"):
        overrides, lr = TRAIN_SETTINGS[architecture]
        overrides = {**overrides, "prefixes": (16, 64)} if architecture == "matryoshka" else overrides
        sae = Dictionary(make_config(architecture, d_in=d, d_sae=64, **overrides), device="cpu")
        batches, held = stream(activations, architecture, batch=64)
        with DeviceAudit() as audit:
            sae.init_weights(0)
            train(sae, batches, steps=4, lr=lr, progress=False, dead_after=32)
            evaluate(sae, [held]).summary()
        assert not audit.leaks, audit.report()


@pytest.mark.gpu
def test_training_and_metrics_on_cuda(activations, tmp_path):
    from mechscope.dictionaries import evaluate, train

    d = activations[RESID1].shape[1]
    for architecture in ("topk", "batchtopk", "jumprelu", "crosscoder"):
        overrides, lr = TRAIN_SETTINGS[architecture]
        sae = Dictionary(make_config(architecture, d_in=d, d_sae=128, **overrides), device="cuda").init_weights(0)
        batches, held = stream(activations, architecture)
        before = evaluate(sae, [held]).fvu()
        train(sae, batches, steps=100, lr=lr, progress=False, checkpoint=tmp_path / architecture)
        stats = evaluate(sae, [held])
        assert sae.W_dec.device.type == "cuda" and stats.fvu() < before
        back = Dictionary.load(tmp_path / architecture, device="cuda")
        x = held.to("cuda")
        torch.testing.assert_close(back(x), sae(x))
