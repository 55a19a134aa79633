"""The toys' shared parts: the hooked toy transformer, seeded training with atomic checkpoints, resume
after an interrupt, and config overrides from the command line."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from mechscope.toys import HookedToyTransformer, ToyConfig, ToyError, TrainState, read_checkpoint, save_checkpoint, train_loop
from mechscope.toys.registry import parse_overrides


def small(**kw) -> HookedToyTransformer:
    cfg = ToyConfig(n_layers=2, n_heads=2, d_model=16, d_head=8, d_vocab=11, n_ctx=8, **kw)
    return HookedToyTransformer(cfg).init_weights(seed=3)


def test_causal_attention_ignores_later_tokens():
    model = small()
    tokens = torch.randint(0, 11, (3, 8), generator=torch.Generator().manual_seed(0))
    changed = tokens.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 11
    assert torch.allclose(model(tokens)[:, :5], model(changed)[:, :5], atol=1e-6)
    assert not torch.allclose(model(tokens)[:, 5:], model(changed)[:, 5:])


def test_attention_only_model_writes_zero_through_its_mlp_hooks():
    model = small()
    assert model.cfg.attn_only and not hasattr(model.blocks[0], "mlp")
    _, cache = model.run_with_cache(torch.zeros(1, 4, dtype=torch.long))
    assert cache["blocks.1.hook_mlp_out"].abs().max() == 0
    assert cache["blocks.0.attn.hook_pattern"].shape == (1, 2, 4, 4)
    with_mlp = small(d_mlp=32, act_fn="gelu")
    _, cache = with_mlp.run_with_cache(torch.zeros(1, 4, dtype=torch.long))
    assert cache["blocks.0.mlp.hook_post"].shape == (1, 4, 32)
    assert cache["blocks.0.hook_mlp_out"].abs().max() > 0


def test_split_qkv_and_attn_result_leave_the_logits_unchanged():
    model = small(d_mlp=16)
    tokens = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(1))
    want = model(tokens)
    model.set_use_split_qkv_input(True)
    model.set_use_attn_result(True)
    model.set_use_hook_mlp_in(True)
    assert torch.allclose(model(tokens), want, atol=1e-5)


def test_init_is_seeded_and_configs_are_checked():
    a, b = small(), small()
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(HookedToyTransformer(a.cfg).init_weights(seed=4).W_E, a.W_E)
    with pytest.raises(ValueError, match="d_model"):
        ToyConfig(n_layers=1, n_heads=1, d_model=0, d_head=1, d_vocab=2, n_ctx=2)
    with pytest.raises(ValueError, match="attention_dir"):
        ToyConfig(n_layers=1, n_heads=1, d_model=2, d_head=1, d_vocab=2, n_ctx=2, attention_dir="sideways")
    cfg = ToyConfig.from_dict(a.cfg.to_dict())
    assert cfg == a.cfg


@dataclass
class Cfg:
    steps: int = 30
    lr: float = 0.05
    seed: int = 0
    sizes: tuple = (1, 2)
    tied: bool = False


def _regression(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 1)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(9))
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    return model, opt, lambda step: ((model(x[step % 4::4]) - y[step % 4::4]) ** 2).mean()


def test_training_lowers_the_loss_and_records_history(tmp_path):
    model, opt, loss = _regression()
    saves = []
    state = train_loop(model, opt, loss, steps=60, eval_fn=lambda s: {"mse": float(loss(0))}, eval_every=20,
                       save=lambda st: saves.append(st.step), checkpoint_every=25, progress=False)
    assert [r["step"] for r in state.history] == [20, 40, 60]
    assert state.history[-1]["mse"] < state.history[0]["mse"]
    assert saves == [25, 50, 60]


def test_an_interrupt_leaves_the_last_checkpoint_and_resume_reaches_the_same_parameters(tmp_path):
    out = tmp_path / "ckpt"
    model, opt, loss = _regression()
    full = train_loop(model, opt, loss, steps=40, progress=False)
    want = {k: v.clone() for k, v in model.state_dict().items()}

    model, opt, loss = _regression()

    def interrupted(step):
        if step == 27:
            raise KeyboardInterrupt
        return loss(step)

    save = lambda st: save_checkpoint(out, "regression", Cfg(), model, opt, st)  # noqa: E731
    with pytest.raises(KeyboardInterrupt):
        train_loop(model, opt, interrupted, steps=40, save=save, checkpoint_every=10, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary left beside it
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "optimizer.pt", "toy.json"]
    ckpt = read_checkpoint(out, expect="regression")
    assert ckpt.state.step == 20

    model, opt, loss = _regression(seed=5)  # different start: everything comes from the checkpoint
    model.load_state_dict(ckpt.tensors)
    opt.load_state_dict(ckpt.optimizer)
    state = train_loop(model, opt, loss, steps=40, state=ckpt.state, progress=False)
    assert state.step == full.step == 40
    for k, v in model.state_dict().items():
        assert torch.allclose(v, want[k], atol=1e-6), k
    with pytest.raises(ToyError, match="not 'other'"):
        read_checkpoint(out, expect="other")
    with pytest.raises(ToyError, match="no toy.json"):
        read_checkpoint(tmp_path)


def test_a_non_finite_loss_stops_with_the_step():
    model, opt, _ = _regression()
    with pytest.raises(ToyError, match="step 0"):
        train_loop(model, opt, lambda s: torch.tensor(float("nan"), requires_grad=True), steps=3, progress=False)
    with pytest.raises(ToyError, match="past the 5 steps"):
        train_loop(model, opt, lambda s: torch.zeros(()), steps=5, state=TrainState(step=9), progress=False)


def test_overrides_are_parsed_by_field_type():
    cfg = parse_overrides(Cfg, ["steps=7", "lr=1e-3", "sizes=3,4", "tied=yes"])
    assert cfg == Cfg(steps=7, lr=1e-3, sizes=(3, 4), tied=True)
    with pytest.raises(ToyError, match="no field 'stpes'"):
        parse_overrides(Cfg, ["stpes=7"])
    with pytest.raises(ToyError, match="not a valid int"):
        parse_overrides(Cfg, ["steps=many"])
    with pytest.raises(ToyError, match="KEY=VALUE"):
        parse_overrides(Cfg, ["steps"])
