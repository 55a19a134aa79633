"""The activation buffer hands out exactly the activations run_with_cache gives (every kept position
once, shuffled), holds no more than its bound, skips BOS and padding, and is reproducible."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from devicecheck import DeviceAudit

import mechscope
from mechscope.dictionaries.activations import (ActivationBuffer, ActivationError, for_dictionary, hook_widths,
                                                training_tokens)
from mechscope.errors import ParameterError
from mechscope.lens.text import TextError

DOCS = ["When Mary and John went to the store, John gave a drink to Mary.",
        "The war lasted from the year 1732 to the year 1737.",
        "The designer was good friends with the analyst because she liked everyone."] * 3


@pytest.fixture(scope="module")
def model(tiny_model_dirs):
    return mechscope.load_model(str(tiny_model_dirs["llama"]), device="cpu")


@pytest.fixture(scope="module")
def tokens(model):
    return training_tokens(model, DOCS, length=12)


def _cache(model, tokens, points):
    model.set_use_hook_mlp_in(True)
    _, cache = model.run_with_cache(tokens)
    return {p: cache[p].reshape(*tokens.shape, -1) for p in points}


def _drain(buffer):
    batches = list(buffer)
    acts = [b[0] for b in batches]
    where = torch.cat([b[1] for b in batches])
    return acts, where


def _check_exact(acts, where, want, keep):
    """Every kept (sequence, position) once, each row equal to the cached activation there."""
    assert where.shape[0] == int(keep.sum())
    assert len({tuple(w) for w in where.tolist()}) == where.shape[0]
    assert torch.equal(keep[where[:, 0], where[:, 1]], torch.ones(where.shape[0], dtype=torch.bool))
    assert torch.allclose(acts, want[where[:, 0], where[:, 1]], atol=1e-5)


def test_one_hook_point_equals_run_with_cache_as_a_multiset(model, tokens):
    point = "blocks.0.hook_resid_post"
    buffer = ActivationBuffer(model, point, tokens, batch_size=16, buffer_size=64, model_batch_size=3,
                              positions=True, progress=False)
    acts, where = _drain(buffer)
    assert all(a.shape == (16, 64) for a in acts[:-1]) and len(acts) == len(buffer)
    keep = torch.ones_like(tokens, dtype=torch.bool)
    keep[:, 0] = False  # BOS
    _check_exact(torch.cat(acts), where, _cache(model, tokens, [point])[point], keep)
    # Shuffled: positions of many sequences in each batch, not in reading order.
    first = where[:16, 0]
    assert len(set(first.tolist())) > 2
    assert buffer.max_held <= 64


def test_transcoder_pairs_crosscoder_stacks_and_flattened_hook_z(model, tokens):
    cache = _cache(model, tokens, ["blocks.0.hook_mlp_in", "blocks.0.hook_mlp_out", "blocks.0.hook_resid_post",
                                   "blocks.1.hook_resid_post", "blocks.1.attn.hook_z"])
    keep = torch.ones_like(tokens, dtype=torch.bool)
    keep[:, 0] = False
    pairs = list(ActivationBuffer(model, "blocks.0.hook_mlp_in", tokens, target="blocks.0.hook_mlp_out",
                                  batch_size=8, buffer_size=48, positions=True, progress=False))
    where = torch.cat([w for _, w in pairs])
    _check_exact(torch.cat([x for (x, _), _ in pairs]), where, cache["blocks.0.hook_mlp_in"], keep)
    _check_exact(torch.cat([y for (_, y), _ in pairs]), where, cache["blocks.0.hook_mlp_out"], keep)

    stack = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    acts, where = _drain(ActivationBuffer(model, stack, tokens, batch_size=8, buffer_size=48, positions=True,
                                          progress=False))
    acts = torch.cat(acts)
    assert acts.shape[1:] == (2, 64)
    for i, p in enumerate(stack):
        _check_exact(acts[:, i], where, cache[p], keep)

    acts, where = _drain(ActivationBuffer(model, "blocks.1.attn.hook_z", tokens, batch_size=8, buffer_size=48,
                                          positions=True, progress=False))
    cfg = model.cfg
    assert acts[0].shape[1] == cfg.n_heads * cfg.d_head
    _check_exact(torch.cat(acts), where, cache["blocks.1.attn.hook_z"], keep)


def test_bos_and_padding_are_skipped_and_counted(model, tokens, capsys):
    mask = torch.ones_like(tokens)
    mask[0, 7:] = 0  # the first sequence padded after 7 tokens
    padded = tokens.clone()
    padded[0, 7:] = model.tokenizer.pad_token_id
    buffer = ActivationBuffer(model, "blocks.0.hook_resid_post", padded, attention_mask=mask, batch_size=8,
                              buffer_size=48, positions=True)
    assert buffer.skipped_bos == tokens.shape[0] and buffer.skipped_padding == 5
    assert f"skipping {tokens.shape[0]} BOS and 5 padding positions" in capsys.readouterr().err
    _, where = _drain(buffer)
    assert where.shape[0] == tokens.numel() - tokens.shape[0] - 5
    assert int((where[:, 1] == 0).sum()) == 0 and int(((where[:, 0] == 0) & (where[:, 1] >= 7)).sum()) == 0
    # With no mask, the pad token (distinct from BOS and EOS) marks padding.
    assert ActivationBuffer(model, "blocks.0.hook_resid_post", padded, batch_size=8, buffer_size=48,
                            progress=False).skipped_padding == 5


def test_memory_stays_within_the_bound_and_the_model_stops_early(model, tokens, monkeypatch):
    from mechscope.dictionaries import activations

    held, depth = [], []
    original = activations.read_activations

    def spy(model_, toks, points, mask=None):
        out = original(model_, toks, points, mask)
        depth.append(toks.shape[0])
        return out

    monkeypatch.setattr(activations, "read_activations", spy)
    buffer = ActivationBuffer(model, "blocks.0.hook_resid_post", tokens, batch_size=4, buffer_size=32,
                              model_batch_size=8, progress=False, plain=False)  # the plain pass: test_plain_pass
    for _ in buffer:
        held.append(buffer.max_held)
    assert max(held) <= 32 and len(depth) > 2  # refilled several times, never past the bound
    assert all(n * 11 <= 32 for n in depth)  # a forward pass reads only what fits

    # Nothing after the deepest hook point runs.
    later = []
    model.add_hook("blocks.1.hook_resid_pre", lambda act, hook: later.append(1))
    try:
        list(ActivationBuffer(model, "blocks.0.attn.hook_z", tokens, batch_size=8, buffer_size=48,
                              progress=False))
        assert later == []
        model(tokens[:1])
        assert later == [1]
    finally:
        model.reset_hooks()


def test_reproducible_with_a_seed_and_looping(model, tokens):
    def batches(seed, **kw):
        return [b for b in ActivationBuffer(model, "blocks.0.hook_resid_post", tokens, batch_size=8,
                                            buffer_size=48, seed=seed, progress=False, **kw)]
    a, b, c = batches(1), batches(1), batches(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)
    assert not torch.equal(a[0], c[0])
    looped = ActivationBuffer(model, "blocks.0.hook_resid_post", tokens, batch_size=8, buffer_size=48,
                              loop=True, drop_last=True, progress=False)
    it = iter(looped)
    got = [next(it) for _ in range(3 * len(a))]  # past one pass: it keeps going, full batches only
    assert all(g.shape == (8, 64) for g in got)


def test_text_sources(model, tmp_path):
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": d}) for d in DOCS))
    txt = tmp_path / "t.txt"
    txt.write_text("\n".join(DOCS))
    a = training_tokens(model, jsonl, length=10)
    assert a.shape[1] == 10 and bool((a[:, 0] == model.tokenizer.bos_token_id).all())
    assert training_tokens(model, DOCS, length=10).shape == a.shape
    assert training_tokens(model, txt, length=10, count=2).shape == (2, 10)
    sampled = training_tokens(model, None, length=6, count=3, seed=4, progress=False)
    assert torch.equal(sampled, training_tokens(model, None, length=6, count=3, seed=4, progress=False))


def test_bad_input_names_the_problem(model, tokens, tmp_path):
    with pytest.raises(ActivationError, match=r"unknown hook point 'blocks.0.hook_nothing'.*blocks\.\{0\.\.1\}\."
                                              r"\{hook_resid_pre.*hook_mlp_out.*attn.hook_z"):
        ActivationBuffer(model, "blocks.0.hook_nothing", tokens, progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(TextError, match="empty.txt: holds no text"):
        training_tokens(model, empty)
    with pytest.raises(TextError, match="list of documents is empty"):
        training_tokens(model, ["", " "])
    with pytest.raises(TextError, match="every one of its 4 positions is BOS or padding"):
        bos = model.tokenizer.bos_token_id
        ActivationBuffer(model, "blocks.0.hook_resid_post", torch.tensor([[bos, 5], [bos, 6]]),
                         attention_mask=torch.tensor([[1, 0], [1, 0]]), progress=False)
    with pytest.raises(ParameterError, match="buffer_size must be at least"):
        ActivationBuffer(model, "blocks.0.hook_resid_post", tokens, batch_size=8, buffer_size=20, progress=False)
    with pytest.raises(ActivationError, match="same width"):
        next(iter(ActivationBuffer(model, ["blocks.0.hook_resid_post", "blocks.0.attn.hook_pattern"], tokens,
                                   batch_size=8, buffer_size=48, progress=False)))
    config = SimpleNamespace(architecture="transcoder", hook_point="blocks.0.hook_mlp_in", d_in=64, d_out=32,
                             out_hook_point="blocks.0.hook_mlp_out", hook_points=())
    with pytest.raises(ActivationError, match="d_out is 32 but hook point blocks.0.hook_mlp_out .* width 64"):
        for_dictionary(model, config, tokens, progress=False)
    config = SimpleNamespace(architecture="topk", hook_point="blocks.1.attn.hook_z", d_in=48, d_out=0,
                             out_hook_point="", hook_points=())
    with pytest.raises(ActivationError, match="d_in is 48 but hook point blocks.1.attn.hook_z .* width 64"):
        for_dictionary(model, config, tokens, progress=False)
    z_width = model.cfg.n_heads * model.cfg.d_head
    assert hook_widths(model, ["blocks.1.attn.hook_z"]) == {"blocks.1.attn.hook_z": z_width}


def test_no_tensor_without_a_device(model, tokens):
    with DeviceAudit() as audit:
        config = SimpleNamespace(architecture="crosscoder", hook_point="", d_in=64, d_out=0, out_hook_point="",
                                 hook_points=("blocks.0.hook_resid_post", "blocks.1.hook_resid_post"))
        list(for_dictionary(model, config, tokens, batch_size=8, buffer_size=48, positions=True, progress=False))
        list(ActivationBuffer(model, "blocks.0.hook_mlp_in", tokens, target="blocks.0.hook_mlp_out", batch_size=8,
                              buffer_size=48, progress=False))
    assert not audit.leaks, audit.report()


@pytest.mark.gpu
def test_on_cuda(tiny_model_dirs):
    model = mechscope.load_model(str(tiny_model_dirs["gpt2"]), device="cuda")
    tokens = training_tokens(model, DOCS, length=12)
    point = "blocks.0.hook_resid_post"
    acts, where = _drain(ActivationBuffer(model, point, tokens, batch_size=16, buffer_size=64, positions=True,
                                          progress=False))
    assert acts[0].device.type == "cuda" and where.device.type == "cuda"
    _, cache = model.run_with_cache(tokens.to("cuda"))
    want = cache[point]
    got = torch.cat(acts)
    assert torch.allclose(got, want[where[:, 0], where[:, 1]], atol=1e-4)
