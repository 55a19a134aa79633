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
