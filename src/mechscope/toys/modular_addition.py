"""Modular addition trained past grokking (Nanda et al. 2023, "Progress measures for grokking via
mechanistic interpretability").

A one-layer transformer (no LayerNorm, ReLU MLP) reads "a b =" (three tokens: the numbers 0..p-1 and
"=" as token p) and predicts (a + b) mod p at the last position. Trained with AdamW and strong weight
decay on a fraction of the p² pairs, it first memorises the training pairs and, much later, generalises
to the held-out ones ("grokking"). The mechanism it ends up with is a Fourier one: the embedding puts
each number a on a few circles, cos(2πka/p) and sin(2πka/p) for a handful of key frequencies k, and
the attention and MLP compose those into cos(2πk(a+b)/p), which the unembedding reads.

The analysis here measures that on the embedding W_E (the rows of the p number tokens):

* its Fourier spectrum: in the orthonormal basis of Z_p (the constant, then cos and sin of frequency
  k = 1..(p-1)/2), the fraction of the embedding's squared norm carried by each frequency. The
  constant component (the mean embedding, the same for every number) carries nothing about the
  number; fractions are of the non-constant part, and the constant's own share is reported aside;
* the key frequencies: the fewest frequencies (largest first) holding `key_fraction` of that norm;
* two ablations through the model's `hook_embed`: projecting the key frequencies out of the embedding
  (the model should fall to chance, 1/p) and projecting out every other frequency (the model should
  keep its accuracy).

Training uses only the last position's logits, so `last_logits` computes them without running the
MLP and the unembedding at the two positions that do not matter (about three times less work; the
tests check that it equals the full forward pass).
"""

from __future__ import annotations

import base64
import html
import io
import math
import time
from dataclasses import dataclass, fields

import torch
from torch.nn import functional as F

from ..devices import HOST, model_device, resolve_device
from .registry import Toy
from .training import ToyError, TrainState, config_from_dict, read_checkpoint, save_checkpoint, train_loop
from .transformer import HookedToyTransformer, ToyConfig

NAME = "modular-addition"


def is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


@dataclass
class ModularAdditionConfig:
    """Nanda et al.'s setting, except two defaults chosen so that the run groks on a CPU in minutes:
    `frac_train` 0.5 (the paper: 0.3) and `lr` 3e-3 (the paper: 1e-3); both only bring grokking
    earlier (more data, faster weight decay per step). `--set frac_train=0.3 --set lr=1e-3` gives the
    paper's run. `stop_after_grok` ends training that many steps after test accuracy first reaches
    `grok_threshold` (-1: train all `steps`)."""

    p: int = 113
    frac_train: float = 0.5
    d_model: int = 128
    n_heads: int = 4
    d_head: int = 32
    d_mlp: int = 512
    lr: float = 3e-3
    weight_decay: float = 1.0
    betas: tuple = (0.9, 0.98)
    steps: int = 20000
    seed: int = 0
    eval_every: int = 50
    grok_threshold: float = 0.99
    stop_after_grok: int = 500
    key_fraction: float = 0.9

    def __post_init__(self):
        def bad(name, why):
            raise ToyError(f"ModularAdditionConfig.{name}: {why}, got {getattr(self, name)!r}")

        if not isinstance(self.p, int) or self.p < 3:
            bad("p", "the modulus must be an integer of at least 3")
        if not is_prime(self.p):
            bad("p", "must be prime (the Fourier analysis of Z_p assumes it)")
        if not 0.0 < self.frac_train < 1.0:
            bad("frac_train", "must lie strictly between 0 and 1")
        n_train = round(self.frac_train * self.p ** 2)
        if not 0 < n_train < self.p ** 2:
            bad("frac_train", f"leaves an empty train or test set of the {self.p ** 2} pairs")
        for name in ("d_model", "n_heads", "d_head", "d_mlp", "steps", "eval_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(name, "must be a positive integer")
        if not self.lr > 0:
            bad("lr", "must be positive")
        if not self.weight_decay >= 0:
            bad("weight_decay", "must be 0 or more")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            bad("betas", "must be two numbers in [0, 1)")
        self.betas = tuple(float(b) for b in self.betas)
        if not 0.0 < self.grok_threshold <= 1.0:
            bad("grok_threshold", "must lie in (0, 1]")
        if not 0.0 < self.key_fraction <= 1.0:
            bad("key_fraction", "must lie in (0, 1]")
        if not isinstance(self.stop_after_grok, int) or self.stop_after_grok < -1:
            bad("stop_after_grok", "must be -1 (never stop early) or a number of steps")

    @property
    def n_train(self) -> int:
        return round(self.frac_train * self.p ** 2)

    def model_config(self, device=None) -> ToyConfig:
        return ToyConfig(n_layers=1, n_heads=self.n_heads, d_model=self.d_model, d_head=self.d_head,
                         d_vocab=self.p + 1, n_ctx=3, d_mlp=self.d_mlp, d_vocab_out=self.p, act_fn="relu",
                         model_name=NAME, device=device or HOST)


# Data ---------------------------------------------------------------------------------------------

@dataclass
class Split:
    """Every pair (a, b) as tokens [p², 3] = (a, b, p) with labels (a + b) mod p, and the seeded split."""

    tokens: torch.Tensor
    labels: torch.Tensor
    train: torch.Tensor  # indices into tokens
    test: torch.Tensor


def make_split(config: ModularAdditionConfig, device=None) -> Split:
    p = config.p
    device = torch.device(device or HOST)
    a = torch.arange(p, device=device).repeat_interleave(p)
    b = torch.arange(p, device=device).repeat(p)
    tokens = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    order = torch.randperm(p * p, generator=torch.Generator(device=HOST).manual_seed(config.seed), device=HOST)
    order = order.to(device)
    return Split(tokens, (a + b) % p, order[:config.n_train], order[config.n_train:])


def last_logits(model: HookedToyTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """The logits at the last position of a one-layer causal model, `model(tokens)[:, -1]`, computed for
    that position only: the embeddings, queries, keys and values come from per-(position, token)
    tables, and the MLP and unembedding run on one position instead of all. Hooks do not run."""
    cfg = model.cfg
    if cfg.n_layers != 1 or cfg.attention_dir != "causal" or not cfg.d_mlp:
        raise ToyError("last_logits needs a one-layer causal model with an MLP")
    tokens = tokens.to(model.W_E.device)
    n, t = tokens.shape
    block = model.blocks[0]
    attn, mlp = block.attn, block.mlp
    table = model.W_E[None, :, :] + model.W_pos[:t, None, :]  # [pos, vocab, d]
    pos = torch.arange(t, device=tokens.device)
    resid = table[pos[None, :], tokens]  # [n, pos, d]
    h, e = cfg.n_heads, cfg.d_head
    flat_table = table.reshape(-1, cfg.d_model)
    k = (flat_table @ attn.W_K.permute(1, 0, 2).reshape(cfg.d_model, h * e)).view(-1, h, e) + attn.b_K
    v = (flat_table @ attn.W_V.permute(1, 0, 2).reshape(cfg.d_model, h * e)).view(-1, h, e) + attn.b_V
    flat = pos[None, :] * cfg.d_vocab + tokens  # [n, pos] rows of the flattened table
    k, v = k[flat], v[flat]  # [n, pos, h, e]
    q = (resid[:, -1] @ attn.W_Q.permute(1, 0, 2).reshape(cfg.d_model, h * e)).view(n, h, e) + attn.b_Q
    scale = cfg.attn_scale if cfg.attn_scale > 0 else math.sqrt(cfg.d_head)
    pattern = torch.softmax((q[:, None] * k).sum(-1) / scale, dim=1)  # [n, pos, h]
    z = (pattern[..., None] * v).sum(1)  # [n, h, e]
    x = resid[:, -1] + z.reshape(n, h * e) @ attn.W_O.reshape(h * e, cfg.d_model) + attn.b_O
    x = x + torch.relu(x @ mlp.W_in + mlp.b_in) @ mlp.W_out + mlp.b_out
    return x @ model.W_U + model.b_U


def _measure(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    loss = F.cross_entropy(logits.float(), labels)
    return float(loss), float((logits.argmax(-1) == labels).float().mean())


def grok_step(history: list[dict], threshold: float) -> int | None:
    """The first evaluated step at which test accuracy reached `threshold` (None: not yet)."""
    for row in history:
        if row.get("test_acc", 0.0) >= threshold:
            return int(row["step"])
    return None


# Training -----------------------------------------------------------------------------------------

@dataclass
class TrainedModularAddition:
    config: ModularAdditionConfig
    model: HookedToyTransformer
    state: TrainState
    seconds: float = 0.0  # wall time of the training call (0 when loaded)

    @property
    def grok_step(self) -> int | None:
        return grok_step(self.state.history, self.config.grok_threshold)

    @property
    def summary(self) -> dict:
        out = {"p": self.config.p, "steps_trained": self.state.step, "grok_step": self.grok_step}
        for key in ("train_acc", "test_acc", "train_loss", "test_loss"):
            out[key] = self.state.last(key)
        if self.seconds:
            out["train_seconds"] = round(self.seconds, 1)
        return out


RESUMABLE = ("steps", "eval_every", "stop_after_grok", "grok_threshold", "key_fraction")


def train(config: ModularAdditionConfig, out=None, device=None, progress: bool = True,
          resume: bool = False) -> TrainedModularAddition:
    """Train with full-batch AdamW on the seeded training split; checkpoints go to `out` (every 1000
    steps and at the end). With `resume`, training continues from `out`'s checkpoint, whose config
    must agree with `config` except for the fields of RESUMABLE."""
    device = resolve_device(device)
    model = HookedToyTransformer(config.model_config(device)).init_weights(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  betas=config.betas)
    state = TrainState()
    if resume:
        if out is None:
            raise ToyError("resume needs the checkpoint directory (out)")
        ckpt = read_checkpoint(out, device=device, expect=NAME)
        saved = config_from_dict(ModularAdditionConfig, ckpt.config, where=f"{out}/toy.json")
        differ = [f.name for f in fields(config) if f.name not in RESUMABLE
                  and getattr(config, f.name) != getattr(saved, f.name)]
        if differ:
            was = ", ".join(f"{k}={getattr(saved, k)!r}" for k in differ)
            raise ToyError(f"{out}: the checkpoint was trained with {was}; "
                           "resume with the same settings")
        model.load_state_dict(ckpt.tensors)
        if ckpt.optimizer is not None:
            optimizer.load_state_dict(ckpt.optimizer)
        state = ckpt.state
    split = make_split(config, device)
    x_train, y_train = split.tokens[split.train], split.labels[split.train]
    x_test, y_test = split.tokens[split.test], split.labels[split.test]

    def loss_fn(step):
        return F.cross_entropy(last_logits(model, x_train), y_train)

    def eval_fn(step):
        train_loss, train_acc = _measure(last_logits(model, x_train), y_train)
        test_loss, test_acc = _measure(last_logits(model, x_test), y_test)
        return {"train_loss": train_loss, "train_acc": train_acc, "test_loss": test_loss, "test_acc": test_acc}

    def stop_fn(st):
        grokked = grok_step(st.history, config.grok_threshold)
        return config.stop_after_grok >= 0 and grokked is not None and st.step >= grokked + config.stop_after_grok

    def save(st):
        save_checkpoint(out, NAME, config, model, optimizer, st)

    start = time.perf_counter()
    state = train_loop(model, optimizer, loss_fn, steps=config.steps, state=state, eval_fn=eval_fn,
                       eval_every=config.eval_every, save=save if out is not None else None,
                       checkpoint_every=1000 if out is not None else 0,
                       stop_fn=stop_fn, progress=progress, desc=f"{NAME} p={config.p}")
    return TrainedModularAddition(config, model, state, time.perf_counter() - start)


def load(path, device=None) -> TrainedModularAddition:
    device = resolve_device(device)
    ckpt = read_checkpoint(path, device=device, expect=NAME)
    config = config_from_dict(ModularAdditionConfig, ckpt.config, where=f"{path}/toy.json")
    model = HookedToyTransformer(config.model_config(device))
    try:
        model.load_state_dict(ckpt.tensors)
    except RuntimeError as exc:
        raise ToyError(f"{path}/model.safetensors does not fit the config in toy.json: {exc}".splitlines()[0]) from None
    model.eval()
    return TrainedModularAddition(config, model, ckpt.state)


# Fourier analysis ---------------------------------------------------------------------------------

def fourier_basis(p: int, device=None, dtype=torch.float64) -> tuple[torch.Tensor, list[str]]:
    """The orthonormal Fourier basis of functions on Z_p (p odd), as rows [p, p]: the constant, then
    cos(2πkx/p) and sin(2πkx/p) for k = 1..(p-1)/2, and each row's name."""
    x = torch.arange(p, device=device, dtype=dtype)
    rows, names = [torch.full((p,), 1.0, device=device, dtype=dtype)], ["const"]
    for k in range(1, (p - 1) // 2 + 1):
        rows += [torch.cos(2 * math.pi * k * x / p), torch.sin(2 * math.pi * k * x / p)]
        names += [f"cos {k}", f"sin {k}"]
    basis = torch.stack(rows)
    return basis / basis.norm(dim=1, keepdim=True), names


def frequency_rows(freqs) -> list[int]:
    """The basis rows (cos, sin) of frequencies k >= 1."""
    return [r for k in freqs for r in (2 * k - 1, 2 * k)]


def ablate_frequencies(W: torch.Tensor, freqs, basis: torch.Tensor) -> torch.Tensor:
    """`W` ([p, d], a function of the number) with the components of frequencies `freqs` projected out."""
    rows = basis[frequency_rows(freqs)].to(W.dtype)
    return W - rows.T @ (rows @ W)


def embedding_spectrum(W: torch.Tensor, basis: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The constant's share of ||W||² and, per frequency k = 1..(p-1)/2, its share of the non-constant
    part of ||W||² (cos² + sin² components)."""
    energy = (basis @ W.to(basis.dtype)).pow(2).sum(1)
    per_freq = energy[1::2] + energy[2::2]
    return float(energy[0] / energy.sum()), per_freq / per_freq.sum()


def key_frequencies(fractions: torch.Tensor, key_fraction: float) -> list[int]:
    """The fewest frequencies (largest first; k counted from 1) whose shares add up to `key_fraction`."""
    order = torch.argsort(fractions, descending=True, stable=True)
    cumulative = torch.cumsum(fractions[order], 0)
    n = int((cumulative < key_fraction - 1e-12).sum()) + 1
    return sorted(int(i) + 1 for i in order[:min(n, len(order))])


def ablated_accuracy(model: HookedToyTransformer, tokens: torch.Tensor, labels: torch.Tensor, freqs,
                     basis: torch.Tensor, batch: int = 4096) -> tuple[float, float]:
    """(accuracy, loss) of the full hooked model with frequencies `freqs` projected out of the number
    tokens' embeddings (through `hook_embed`; the "=" token keeps its embedding)."""
    p = model.cfg.d_vocab_out
    table = model.W_E.detach().clone()
    table[:p] = ablate_frequencies(table[:p].to(basis.dtype), freqs, basis).to(table.dtype)

    def replace(embed, hook=None):
        return table[tokens_now[0]]

    correct, loss = 0, 0.0
    with torch.no_grad(), model.hooks(fwd_hooks=[("hook_embed", replace)]):
        for start in range(0, len(tokens), batch):
            tokens_now = [tokens[start:start + batch].to(table.device)]
            logits = model(tokens_now[0])[:, -1]
            y = labels[start:start + batch].to(logits.device)
            correct += int((logits.argmax(-1) == y).sum())
            loss += float(F.cross_entropy(logits.float(), y, reduction="sum"))
    return correct / len(tokens), loss / len(tokens)


@dataclass
class ModularAdditionAnalysis:
    config: ModularAdditionConfig
    history: list[dict]
    summary: dict

    def curve_png(self, path) -> None:
        _figure(self, path, panels=("curve",))

    def spectrum_png(self, path) -> None:
        _figure(self, path, panels=("spectrum",))

    def figure_png(self, path) -> None:
        """The grokking curve and the Fourier spectrum side by side (the README figure)."""
        _figure(self, path, panels=("curve", "spectrum"))

    def files(self) -> dict:
        return {"grokking.png": self.curve_png, "fourier.png": self.spectrum_png}

    def sections(self) -> list:
        from ..report.page import Section

        s = self.summary
        key = set(s["key_frequencies"])
        rows = "".join(
            f"<tr><td class='num'>{k}</td><td class='num'>{f:.4f}</td><td>{'key' if k in key else ''}</td></tr>"
            for k, f in sorted(enumerate(s["frequency_fractions"], 1), key=lambda kf: -kf[1])[:max(10, len(key))])
        acc = (("trained model", s["test_acc"]),
               (f"key frequencies {s['key_frequencies']} ablated", s["test_acc_key_ablated"]),
               ("all other frequencies ablated", s["test_acc_rest_ablated"]), ("chance (1/p)", s["chance"]))
        acc_rows = "".join(f"<tr><td>{html.escape(name)}</td><td class='num'>{a:.4f}</td></tr>" for name, a in acc)
        grok = "not reached" if s["grok_step"] is None else f"step {s['grok_step']}"
        body = f"""<p>One-layer transformer on (a + b) mod {s['p']}, trained on {s['n_train']} of the
{s['p'] ** 2} pairs for {s['steps_trained']} steps; test accuracy reached {self.config.grok_threshold:g} at {grok}.
The embedding's non-constant norm is {100 * s['key_norm_fraction']:.1f}% in {len(key)} frequencies
(the constant, the mean embedding, holds {100 * s['constant_fraction']:.2f}% of it all).</p>
<div style="display:flex;flex-wrap:wrap;gap:12px">{_img(self.curve_png)}{_img(self.spectrum_png)}</div>
<div style="display:flex;flex-wrap:wrap;gap:32px">
<table><tr><th>test accuracy</th><th></th></tr>{acc_rows}</table>
<table><tr><th>frequency k</th><th>share of ||W_E||²</th><th></th></tr>{rows}</table></div>
<p class="note">Shares are of the squared norm of the number tokens' embeddings in the orthonormal Fourier
basis of Z_p (cos and sin of 2πka/p), without the constant component. Ablating projects the named
frequencies out of every number's embedding (through hook_embed) and measures the test pairs.</p>"""
        return [Section("modular-addition", "Modular addition: grokking and the Fourier embedding", body)]


def _img(writer) -> str:
    buf = io.BytesIO()
    writer(buf)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="figure" style="max-width:100%" src="data:image/png;base64,{data}">'


def _figure(analysis: ModularAdditionAnalysis, path, panels) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = analysis.summary
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 3.8), constrained_layout=True, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "curve":
            steps = [r["step"] for r in analysis.history]
            ax.plot(steps, [r["train_acc"] for r in analysis.history], label="train accuracy", color="#2563eb")
            ax.plot(steps, [r["test_acc"] for r in analysis.history], label="test accuracy", color="#dc2626")
            if s["grok_step"] is not None:
                ax.axvline(s["grok_step"], color="#999", ls=":", lw=1)
                ax.annotate(f"groks at {s['grok_step']}", (s["grok_step"], 0.5), xytext=(4, 0),
                            textcoords="offset points", fontsize=8, color="#555")
            ax.axhline(1 / s["p"], color="#999", lw=0.8, ls="--")
            ax.set_xlabel("training step")
            ax.set_ylabel("accuracy")
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"(a + b) mod {s['p']}: train {s['n_train']} pairs, test {s['p'] ** 2 - s['n_train']}")
            ax.legend(loc="center right", fontsize=8)
        else:
            fr = s["frequency_fractions"]
            key = set(s["key_frequencies"])
            ks = range(1, len(fr) + 1)
            ax.bar(ks, fr, color=["#dc2626" if k in key else "#94a3b8" for k in ks])
            ax.set_xlabel("frequency k")
            ax.set_ylabel("share of embedding norm²")
            ax.set_title(f"W_E Fourier spectrum: key k = {', '.join(map(str, sorted(key)))} "
                         f"({100 * s['key_norm_fraction']:.0f}%)")
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def analyze(trained: TrainedModularAddition, progress: bool = True) -> ModularAdditionAnalysis:
    config, model = trained.config, trained.model
    device = model_device(model)
    split = make_split(config, device)
    basis, _ = fourier_basis(config.p, device=device)
    W = model.W_E.detach()[:config.p]
    constant, fractions = embedding_spectrum(W, basis)
    key = key_frequencies(fractions, config.key_fraction)
    rest = [k for k in range(1, (config.p - 1) // 2 + 1) if k not in key]
    model.eval()
    x_test, y_test = split.tokens[split.test], split.labels[split.test]
    x_train, y_train = split.tokens[split.train], split.labels[split.train]
    test_acc, test_loss = ablated_accuracy(model, x_test, y_test, [], basis)
    train_acc, train_loss = ablated_accuracy(model, x_train, y_train, [], basis)
    key_acc, key_loss = ablated_accuracy(model, x_test, y_test, key, basis)
    rest_acc, rest_loss = ablated_accuracy(model, x_test, y_test, rest, basis)
    summary = {
        "p": config.p, "n_train": config.n_train, "steps_trained": trained.state.step, "grok_step": trained.grok_step,
        "train_acc": train_acc, "train_loss": train_loss, "test_acc": test_acc, "test_loss": test_loss,
        "chance": 1 / config.p, "constant_fraction": constant, "key_frequencies": key, "n_key_frequencies": len(key),
        "key_norm_fraction": float(fractions[[k - 1 for k in key]].sum()),
        "test_acc_key_ablated": key_acc, "test_loss_key_ablated": key_loss,
        "test_acc_rest_ablated": rest_acc, "test_loss_rest_ablated": rest_loss,
        "frequency_fractions": [float(f) for f in fractions],
    }
    return ModularAdditionAnalysis(config, list(trained.state.history), summary)


TOY = Toy(name=NAME,
          description="(a + b) mod p trained past grokking (Nanda et al. 2023): the key Fourier frequencies of "
                      "the embedding, and test accuracy with them ablated",
          config=ModularAdditionConfig, train=train, load=load, analyze=analyze)
