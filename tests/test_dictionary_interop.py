"""SAELens and sparsify directories, written here with random weights in those tools' layouts, load as
Dictionaries whose reconstructions are the ones the weights imply (computed by hand below); a
Dictionary exported to SAELens' layout loads back with the same outputs; bad files are refused with
their path."""

from __future__ import annotations

import json

import pytest
import torch
from devicecheck import DeviceAudit
from safetensors.torch import save_file

from mechscope.dictionaries.dictionary import Dictionary, DictionaryConfig, DictionaryError
from mechscope.dictionaries.interop import (export_saelens, load_any, load_saelens, load_sparsify,
                                            load_sparsify_run, sparsify_hook_point)

D_IN, D_SAE, D_OUT, K = 12, 40, 9, 5


def _rand(gen, *shape, scale=1.0):
    return torch.randn(*shape, generator=gen) * scale


def _write(folder, cfg, tensors, weights):
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / weights))
    return folder


def _topk_by_hand(pre, k):
    """Each row's k largest entries (ReLU'd), zero elsewhere: the k-th largest value found by sorting."""
    kth = pre.sort(dim=-1, descending=True).values[..., k - 1:k]
    return torch.where(pre >= kth, pre.clamp_min(0), torch.zeros_like(pre))


def _saelens_cfg(arch, **extra):
    cfg = {"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"model_name": "tiny", "hook_name": "blocks.1.hook_resid_post", "hook_head_index": None}}
    cfg.update(extra)
    return cfg


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@pytest.fixture
def x(gen):
    return _rand(gen, 7, D_IN)


def _sae_tensors(gen, d_out=D_IN):
    return {"W_enc": _rand(gen, D_IN, D_SAE, scale=0.5), "b_enc": _rand(gen, D_SAE, scale=0.3),
            "W_dec": _rand(gen, D_SAE, d_out, scale=0.3), "b_dec": _rand(gen, d_out, scale=0.5)}


@pytest.mark.parametrize("applied", [True, False])
def test_saelens_standard(tmp_path, gen, x, applied):
    t = _sae_tensors(gen)
    folder = _write(tmp_path / "sae", _saelens_cfg("standard", apply_b_dec_to_input=applied), t,
                    "sae_weights.safetensors")
    d = load_saelens(folder)
    assert d.config.architecture == "relu" and d.config.hook_point == "blocks.1.hook_resid_post"
    assert d.config.model_name == "tiny"
    inp = x - t["b_dec"] if applied else x
    f = torch.relu(inp @ t["W_enc"] + t["b_enc"])
    assert torch.allclose(d.encode(x), f, atol=1e-5)
    assert torch.allclose(d(x), f @ t["W_dec"] + t["b_dec"], atol=1e-5)


@pytest.mark.parametrize("layout", ["current", "older"])
def test_saelens_topk(tmp_path, gen, x, layout):
    t = _sae_tensors(gen)
    cfg = _saelens_cfg("topk", k=K) if layout == "current" else \
        {**_saelens_cfg("standard"), "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K},
         "metadata": None, "hook_name": "blocks.0.hook_mlp_out", "model_name": "tiny"}
    d = load_saelens(_write(tmp_path / "sae", cfg, t, "sae_weights.safetensors"))
    assert d.config.architecture == "topk" and d.config.k == K
    f = _topk_by_hand((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"], K)
    assert torch.allclose(d(x), f @ t["W_dec"] + t["b_dec"], atol=1e-5)
    assert int((d.encode(x) != 0).sum(-1).max()) <= K


def test_saelens_jumprelu_and_gated(tmp_path, gen, x):
    t = _sae_tensors(gen)
    t["threshold"] = _rand(gen, D_SAE, scale=0.5)  # some below zero: SAELens' ReLU still applies
    d = load_saelens(_write(tmp_path / "jr", _saelens_cfg("jumprelu"), t, "sae_weights.safetensors"))
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    f = torch.relu(pre) * (pre > t["threshold"])
    assert torch.allclose(d(x), f @ t["W_dec"] + t["b_dec"], atol=1e-5)

    g = {n: t[n] for n in ("W_enc", "W_dec", "b_dec")}
    g.update(b_gate=_rand(gen, D_SAE, scale=0.3), b_mag=_rand(gen, D_SAE, scale=0.3),
             r_mag=_rand(gen, D_SAE, scale=0.2))
    for applied in (True, False):
        d = load_saelens(_write(tmp_path / f"gated{applied}", _saelens_cfg("gated", apply_b_dec_to_input=applied), g,
                                "sae_weights.safetensors"))
        inp = x - g["b_dec"] if applied else x
        gate = (inp @ g["W_enc"] + g["b_gate"]) > 0
        mag = torch.relu(inp @ (g["W_enc"] * g["r_mag"].exp()) + g["b_mag"])
        assert torch.allclose(d(x), (gate * mag) @ g["W_dec"] + g["b_dec"], atol=1e-5)


def test_saelens_transcoders(tmp_path, gen, x):
    t = _sae_tensors(gen, d_out=D_OUT)
    common = dict(d_out=D_OUT, apply_b_dec_to_input=False,
                  metadata={"hook_name": "blocks.0.ln2.hook_out", "hook_name_out": "blocks.0.hook_mlp_out"})
    d = load_saelens(_write(tmp_path / "tc", _saelens_cfg("transcoder", **common), t, "sae_weights.safetensors"))
    assert (d.config.architecture, d.config.out_hook_point, d.config.d_out) == \
        ("transcoder", "blocks.0.hook_mlp_out", D_OUT)
    f = torch.relu(x @ t["W_enc"] + t["b_enc"])
    assert torch.allclose(d(x), f @ t["W_dec"] + t["b_dec"], atol=1e-5)

    skip = {**t, "W_skip": _rand(gen, D_OUT, D_IN, scale=0.3)}
    d = load_saelens(_write(tmp_path / "skip", _saelens_cfg("skip_transcoder", **common), skip,
                            "sae_weights.safetensors"))
    assert d.config.architecture == "skip_transcoder"
    assert torch.allclose(d(x), f @ t["W_dec"] + t["b_dec"] + x @ skip["W_skip"].T, atol=1e-5)

    jr = {**t, "threshold": _rand(gen, D_SAE, scale=0.5).abs()}
    d = load_saelens(_write(tmp_path / "jrtc", _saelens_cfg("jumprelu_transcoder", **common), jr,
                            "sae_weights.safetensors"))
    pre = x @ t["W_enc"] + t["b_enc"]
    assert torch.allclose(d(x), (torch.relu(pre) * (pre > jr["threshold"])) @ t["W_dec"] + t["b_dec"], atol=1e-5)


def _sparsify_tensors(gen, skip=False):
    t = {"encoder.weight": _rand(gen, D_SAE, D_IN, scale=0.5), "encoder.bias": _rand(gen, D_SAE, scale=0.3),
         "W_dec": _rand(gen, D_SAE, D_IN, scale=0.3), "b_dec": _rand(gen, D_IN, scale=0.5)}
    if skip:
        t["W_skip"] = _rand(gen, D_IN, D_IN, scale=0.3)
    return t


def _sparsify_cfg(**extra):
    return {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": D_SAE, "k": K,
            "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D_IN, **extra}


def test_sparsify_sae_and_run_directory(tmp_path, gen, x):
    run = tmp_path / "run"
    t = _sparsify_tensors(gen)
    _write(run / "layers.1", _sparsify_cfg(), t, "sae.safetensors")
    _write(run / "layers.0.mlp", _sparsify_cfg(num_latents=0, expansion_factor=2), _sparsify_tensors(gen)
           | {"encoder.weight": _rand(gen, 2 * D_IN, D_IN), "encoder.bias": _rand(gen, 2 * D_IN),
              "W_dec": _rand(gen, 2 * D_IN, D_IN)}, "sae.safetensors")
    d = load_sparsify(run / "layers.1")
    assert (d.config.architecture, d.config.hook_point, d.config.k, d.config.d_sae) == \
        ("topk", "blocks.1.hook_resid_post", K, D_SAE)
    f = _topk_by_hand(torch.relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"]), K)
    assert torch.allclose(d(x), f @ t["W_dec"] + t["b_dec"], atol=1e-5)
    both = load_sparsify_run(run)
    assert list(both) == ["layers.0.mlp", "layers.1"]
    assert both["layers.0.mlp"].config.hook_point == "blocks.0.hook_mlp_out"
    assert both["layers.0.mlp"].config.d_sae == 2 * D_IN


def test_sparsify_transcoders(tmp_path, gen, x):
    t = _sparsify_tensors(gen)
    d = load_sparsify(_write(tmp_path / "layers.2.mlp", _sparsify_cfg(transcode=True), t, "sae.safetensors"))
    assert (d.config.architecture, d.config.hook_point, d.config.out_hook_point) == \
        ("transcoder", "blocks.2.ln2.hook_out", "blocks.2.hook_mlp_out")
    f = _topk_by_hand(torch.relu(x @ t["encoder.weight"].T + t["encoder.bias"]), K)
    assert torch.allclose(d(x), f @ t["W_dec"] + t["b_dec"], atol=1e-5)

    s = _sparsify_tensors(gen, skip=True)
    d = load_sparsify(_write(tmp_path / "layers.3", _sparsify_cfg(transcode=True, skip_connection=True), s,
                             "sae.safetensors"))
    assert (d.config.architecture, d.config.hook_point, d.config.out_hook_point) == \
        ("skip_transcoder", "blocks.3.hook_resid_pre", "blocks.3.hook_resid_post")
    f = _topk_by_hand(torch.relu(x @ s["encoder.weight"].T + s["encoder.bias"]), K)
    assert torch.allclose(d(x), f @ s["W_dec"] + s["b_dec"] + x @ s["W_skip"].T, atol=1e-5)

    # An SAE (input centred on b_dec) with a skip term, under a name given by hand.
    d = load_sparsify(_write(tmp_path / "custom", _sparsify_cfg(skip_connection=True), s, "sae.safetensors"),
                      hook_point="blocks.0.hook_resid_post")
    assert d.config.out_hook_point == "blocks.0.hook_resid_post"
    f = _topk_by_hand(torch.relu((x - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"]), K)
    assert torch.allclose(d(x), f @ s["W_dec"] + s["b_dec"] + x @ s["W_skip"].T, atol=1e-5)
    assert sparsify_hook_point("gpt_neox.layers.4", False) == ("blocks.4.hook_resid_post", "")
    assert sparsify_hook_point("embed_tokens", False) == ("", "")


def _randomised(config, seed):
    d = Dictionary(config).init_weights(seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in d.named_parameters():
            if name.startswith("b_") or name in ("r_mag", "W_skip"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=gen) * 0.5)
        if config.architecture == "batchtopk":
            d.threshold.fill_(0.4)
    return d.eval()


EXPORTS = [
    dict(architecture="relu"), dict(architecture="topk", k=K), dict(architecture="jumprelu"),
    dict(architecture="gated"), dict(architecture="batchtopk", k=K),
    dict(architecture="transcoder", d_out=D_OUT, out_hook_point="blocks.0.hook_mlp_out"),
    dict(architecture="skip_transcoder", d_out=D_OUT, out_hook_point="blocks.0.hook_mlp_out"),
    dict(architecture="transcoder", d_out=D_OUT, out_hook_point="blocks.0.hook_mlp_out", activation="jumprelu"),
]


@pytest.mark.parametrize("fields", EXPORTS, ids=lambda f: f["architecture"] + f.get("activation", ""))
def test_export_to_saelens_and_back(tmp_path, x, fields):
    config = DictionaryConfig(d_in=D_IN, d_sae=D_SAE, hook_point="blocks.0.hook_resid_post", model_name="tiny",
                              **fields)
    d = _randomised(config, 3)
    with DeviceAudit() as audit:
        folder = export_saelens(d, tmp_path / "out")
        back = load_saelens(folder)
    assert not audit.leaks, audit.report()
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_post" and cfg["d_sae"] == D_SAE
    assert torch.allclose(back(x), d(x), atol=1e-5)
    assert torch.equal(back.encode(x) != 0, d.encode(x) != 0)
    with pytest.raises(DictionaryError, match="already exists and is not empty"):
        export_saelens(d, folder)
    export_saelens(d, folder, overwrite=True)


def test_what_has_no_saelens_layout_is_refused(tmp_path):
    cross = DictionaryConfig(architecture="crosscoder", d_in=D_IN, d_sae=D_SAE, hook_point="",
                             hook_points=("blocks.0.hook_resid_post", "blocks.1.hook_resid_post"))
    with pytest.raises(DictionaryError, match="crosscoder has no SAELens layout"):
        export_saelens(Dictionary(cross), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_load_any_reads_each_layout(tmp_path, gen):
    _write(tmp_path / "a", _saelens_cfg("standard"), _sae_tensors(gen), "sae_weights.safetensors")
    _write(tmp_path / "layers.0", _sparsify_cfg(), _sparsify_tensors(gen), "sae.safetensors")
    ours = Dictionary(DictionaryConfig(architecture="relu", d_in=D_IN, d_sae=D_SAE,
                                       hook_point="blocks.0.hook_resid_post")).save(tmp_path / "ours")
    assert load_any(tmp_path / "a").config.architecture == "relu"
    assert load_any(tmp_path / "layers.0").config.architecture == "topk"
    assert load_any(ours).config.hook_point == "blocks.0.hook_resid_post"


def test_bad_files_are_refused_with_their_path(tmp_path, gen):
    t = _sae_tensors(gen)
    weights = "sae_weights.safetensors"

    def refused(name, cfg, tensors, match, loader=load_saelens, file=weights):
        folder = _write(tmp_path / name, cfg, tensors, file)
        with pytest.raises(DictionaryError, match=match.replace("DIR", str(folder))):
            loader(folder)

    refused("norm", _saelens_cfg("standard", normalize_activations="constant_norm_rescale"), t,
            r"DIR/cfg.json: field 'normalize_activations' is 'constant_norm_rescale'")
    refused("arch", _saelens_cfg("clt"), t, r"DIR/cfg.json: field 'architecture' is 'clt'")
    refused("head", _saelens_cfg("standard", metadata={"hook_name": "blocks.0.attn.hook_z", "hook_head_index": 2}), t,
            r"DIR/cfg.json: field 'hook_head_index' is 2")
    refused("shape", _saelens_cfg("standard", d_sae=D_SAE + 1), t,
            r"DIR/sae_weights.safetensors: tensor W_enc has shape \(12, 40\), expected \(12, 41\)")
    refused("extra", _saelens_cfg("standard"), {**t, "log_threshold": t["b_enc"].clone()},
            r"DIR/sae_weights.safetensors: tensors do not match .*unexpected log_threshold")
    refused("nohook", {**_saelens_cfg("standard"), "metadata": {}}, t, r"DIR/cfg.json: no 'hook_name'")
    refused("nan", _saelens_cfg("standard"), {**t, "b_enc": t["b_enc"] * float("nan")},
            r"DIR/sae_weights.safetensors: tensor b_enc holds NaN")
    refused("groupmax", _sparsify_cfg(activation="groupmax"), _sparsify_tensors(gen),
            r"DIR/cfg.json: field 'activation' is 'groupmax'", load_sparsify, "sae.safetensors")
    refused("embed_tokens", _sparsify_cfg(), _sparsify_tensors(gen),
            r"DIR: cannot tell the hook point from the directory name 'embed_tokens'", load_sparsify, "sae.safetensors")

    corrupt = _write(tmp_path / "corrupt", _saelens_cfg("standard"), t, weights)
    (corrupt / weights).write_bytes(b"\x00\x01 not safetensors")
    with pytest.raises(DictionaryError, match=f"{corrupt}/{weights}: not a readable safetensors file"):
        load_saelens(corrupt)
    (corrupt / "cfg.json").write_text("{not json")
    with pytest.raises(DictionaryError, match=f"{corrupt}/cfg.json: not readable JSON"):
        load_saelens(corrupt)
    with pytest.raises(DictionaryError, match=f"{tmp_path / 'nowhere'}: no such directory"):
        load_saelens(tmp_path / "nowhere")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "cfg.json").write_text("{}")
    with pytest.raises(DictionaryError, match=f"{tmp_path / 'foreign'}: missing sae.safetensors"):
        load_sparsify(tmp_path / "foreign")
    with pytest.raises(DictionaryError, match=str(tmp_path / "foreign")):
        load_any(tmp_path / "foreign")


def test_loaded_dictionaries_read_their_hook_points_on_a_model(tmp_path, tiny_model_dirs):
    """sparsify's Hugging Face names map to hook points the model has, of the widths the files say."""
    import mechscope
    from mechscope.dictionaries.activations import for_dictionary, training_tokens

    model = mechscope.load_model(str(tiny_model_dirs["llama"]), device="cpu")
    width = model.cfg.d_model
    gen = torch.Generator().manual_seed(1)
    tensors = {"encoder.weight": _rand(gen, 4 * width, width), "encoder.bias": _rand(gen, 4 * width),
               "W_dec": _rand(gen, 4 * width, width), "b_dec": _rand(gen, width)}
    cfg = {"activation": "topk", "num_latents": 4 * width, "k": 4, "d_in": width}
    tokens = training_tokens(model, ["When Mary and John went to the store, John gave a drink to Mary."] * 4, length=10)
    for name, transcode in (("layers.0.mlp", True), ("layers.1", False)):
        d = load_sparsify(_write(tmp_path / name, {**cfg, "transcode": transcode}, tensors, "sae.safetensors"))
        d.check_model(model)
        batch = next(iter(for_dictionary(model, d.config, tokens, batch_size=8, buffer_size=48, progress=False)))
        x, y = batch if transcode else (batch, batch)
        assert d(x).shape == y.shape == (8, width)
