"""Toy Models of Superposition (Elhage et al. 2022): n sparse features squeezed through m < n dimensions.

Each input x in [0, 1]^n has feature i present with probability 1 - S (the sparsity S is the
probability that a feature is zero) with a uniform value; the model reconstructs it as
x' = ReLU(WᵀW x + b), W of shape (m, n), under the importance-weighted squared error
Σ_i I_i (x_i - x'_i)² with I_i = decay^i. Dense features (S = 0) are stored like PCA: the m most
important features get orthogonal directions and the rest are dropped. As the features get sparser
the model stores more than m of them, in superposition, in regular geometries (antipodal pairs,
pentagons...).

Every sparsity (and several seeds of each, the "instances") is trained at once as one batched model:
W has shape (instances, m, n). The analysis reads, for each instance, the feature norms ||W_i||, the
features stored (||W_i|| > 0.5), their largest mutual |cos|, the per-feature dimensionality
D_i = ||W_i||² / Σ_j (Ŵ_i·W_j)², the interference Σ_{j≠i} (Ŵ_i·W_j)² and the antipodal pairs, and
draws the phase figure, the dimensionality figure and the norm-versus-interference figure.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from ..devices import HOST, resolve_device
from .registry import Toy
from .training import ToyError, TrainState, config_from_dict, read_checkpoint, save_checkpoint, train_loop

NAME = "superposition"
STORED_NORM = 0.5  # a feature is stored when its column of W has at least this norm
ANTIPODAL_COS = -0.9  # two stored features at cosine below this form an antipodal pair
EVAL_BATCH = 16384


@dataclass(frozen=True)
class SuperpositionConfig:
    """The paper's setting: 20 features, 5 hidden dimensions, importance 0.9^i, a sweep of sparsities."""

    n_features: int = 20
    d_hidden: int = 5
    importance_decay: float = 0.9
    sparsities: tuple = (0.0, 0.7, 0.9, 0.97, 0.99, 0.997, 0.999)
    instances_per_sparsity: int = 3
    batch_size: int = 1024
    steps: int = 10_000
    lr: float = 1e-3
    seed: int = 0
    eval_every: int = 500

    def __post_init__(self):
        for name in ("n_features", "d_hidden", "instances_per_sparsity", "batch_size", "steps", "eval_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ToyError(f"SuperpositionConfig.{name} must be a positive integer, got {value!r}")
        if self.d_hidden >= self.n_features:
            raise ToyError(f"SuperpositionConfig.d_hidden ({self.d_hidden}) must be smaller than n_features "
                           f"({self.n_features}): superposition needs fewer dimensions than features")
        if not (isinstance(self.importance_decay, (int, float)) and 0 < self.importance_decay <= 1):
            raise ToyError(f"SuperpositionConfig.importance_decay must be in (0, 1], got {self.importance_decay!r}")
        if not isinstance(self.sparsities, tuple) or not self.sparsities:
            raise ToyError(f"SuperpositionConfig.sparsities must be a non-empty tuple, got {self.sparsities!r}")
        for s in self.sparsities:
            if not isinstance(s, (int, float)) or isinstance(s, bool) or not (0 <= s < 1):
                raise ToyError(f"SuperpositionConfig.sparsities: {s!r} is not in [0, 1) (the probability that "
                               "a feature is zero; 1 would mean no feature is ever present)")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ToyError(f"SuperpositionConfig.lr must be a positive number, got {self.lr!r}")
        if not isinstance(self.seed, int):
            raise ToyError(f"SuperpositionConfig.seed must be an integer, got {self.seed!r}")

    @property
    def n_instances(self) -> int:
        return len(self.sparsities) * self.instances_per_sparsity

    def instance_sparsity(self) -> list[float]:
        """The sparsity of each instance: each sparsity repeated instances_per_sparsity times."""
        return [float(s) for s in self.sparsities for _ in range(self.instances_per_sparsity)]


class SuperpositionModel(nn.Module):
    """`instances` independent copies of x' = ReLU(WᵀW x + b), run side by side.

    W: (instances, d_hidden, n_features); b: (instances, n_features); x: (batch, instances, n_features)."""

    def __init__(self, config: SuperpositionConfig, device=None):
        super().__init__()
        self.config = config
        device = torch.device(device) if device is not None else HOST
        i, m, n = config.n_instances, config.d_hidden, config.n_features
        self.W = nn.Parameter(torch.empty(i, m, n, device=device))
        self.b = nn.Parameter(torch.zeros(i, n, device=device))
        decay = config.importance_decay ** torch.arange(n, device=device, dtype=torch.float32)
        self.register_buffer("importance", decay, persistent=False)
        self.register_buffer("presence", 1 - torch.tensor(config.instance_sparsity(), device=device),
                             persistent=False)

    def init_weights(self, seed: int) -> "SuperpositionModel":
        """Xavier-normal W (std sqrt(2 / (m + n))), zero b; drawn on the host so every device starts alike."""
        g = torch.Generator(device=HOST).manual_seed(seed)
        _, m, n = self.W.shape
        with torch.no_grad():
            self.W.copy_(torch.randn(self.W.shape, generator=g, device=HOST) * math.sqrt(2 / (m + n)))
            self.b.zero_()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.einsum("bin,imn->bim", x, self.W)
        return torch.relu(torch.einsum("bim,imn->bin", hidden, self.W) + self.b)

    def batch(self, size: int, seed: int) -> torch.Tensor:
        """`size` inputs for every instance, drawn on the host from a generator seeded by `seed` and
        moved to the model's device: the same seed gives the same data, and so the same model, on every
        device (CUDA's generator draws other numbers than the CPU's)."""
        g = torch.Generator(device=HOST).manual_seed(seed)
        shape = (size, *self.b.shape)
        present = torch.rand(shape, generator=g, device=HOST) < self.presence.to(HOST)[:, None]
        return (torch.rand(shape, generator=g, device=HOST) * present).to(self.W.device)

    def instance_losses(self, x: torch.Tensor) -> torch.Tensor:
        """The importance-weighted squared error of each instance, averaged over the batch and features."""
        return (self.importance * (x - self(x)) ** 2).mean(dim=(0, 2))


@dataclass
class TrainedSuperposition:
    config: SuperpositionConfig
    model: SuperpositionModel
    state: TrainState

    @property
    def summary(self) -> dict:
        last = self.state.history[-1] if self.state.history else {}
        return {"steps": self.state.step, **{k: v for k, v in last.items() if k != "step"}}


def _eval_seed(config: SuperpositionConfig) -> int:
    return config.seed * 1_000_003 + 999_999_937  # far from every training step's seed


def _step_seed(config: SuperpositionConfig, step: int) -> int:
    return config.seed * 1_000_003 + step


def eval_losses(model: SuperpositionModel, size: int = EVAL_BATCH) -> torch.Tensor:
    """Each instance's loss on a fixed held-out batch (the same for every evaluation)."""
    with torch.no_grad():
        return model.instance_losses(model.batch(size, _eval_seed(model.config)))


def _check_resume(config: SuperpositionConfig, saved: SuperpositionConfig, path) -> None:
    differ = [f.name for f in fields(config) if f.name != "steps" and getattr(config, f.name) != getattr(saved, f.name)]
    if differ:
        raise ToyError(f"{path}: the checkpoint was trained with other values of {', '.join(differ)}; resume with "
                       "the same config (only steps may change)")


def train(config: SuperpositionConfig | None = None, out=None, device=None, progress: bool = True,
          resume: bool = False) -> TrainedSuperposition:
    """Train every instance at once with Adam; checkpoint into `out` (when given) every eval_every steps."""
    config = config or SuperpositionConfig()
    device = resolve_device(device)
    model = SuperpositionModel(config, device=device).init_weights(config.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    state = TrainState()
    if resume:
        if out is None:
            raise ToyError("resume needs the checkpoint directory (out)")
        ckpt = read_checkpoint(out, device=device, expect=NAME)
        _check_resume(config, config_from_dict(SuperpositionConfig, ckpt.config, f"{out}/toy.json"), out)
        model.load_state_dict(ckpt.tensors)
        if ckpt.optimizer is not None:
            optimizer.load_state_dict(ckpt.optimizer)
        state = ckpt.state

    def loss_fn(step: int) -> torch.Tensor:
        return model.instance_losses(model.batch(config.batch_size, _step_seed(config, step))).sum()

    def eval_fn(step: int) -> dict:
        losses = eval_losses(model)
        norms = model.W.detach().norm(dim=1)
        stored = (norms > STORED_NORM).sum(dim=1).tolist()
        per = config.instances_per_sparsity
        return {"eval_loss": float(losses.sum()),
                "stored_densest": max(stored[:per]), "stored_sparsest": max(stored[-per:])}

    save = None
    if out is not None:
        save = lambda st: save_checkpoint(out, NAME, config, model, optimizer, st)  # noqa: E731
    state = train_loop(model, optimizer, loss_fn, steps=config.steps, state=state, eval_fn=eval_fn,
                       eval_every=config.eval_every, save=save, checkpoint_every=config.eval_every,
                       progress=progress, desc=f"superposition ({config.n_instances} instances)")
    return TrainedSuperposition(config, model, state)


def load(path, device=None) -> TrainedSuperposition:
    """A trained superposition toy back from its checkpoint directory."""
    device = resolve_device(device)
    ckpt = read_checkpoint(path, device=device, expect=NAME)
    config = config_from_dict(SuperpositionConfig, ckpt.config, f"{path}/toy.json")
    model = SuperpositionModel(config, device=device)
    try:
        model.load_state_dict(ckpt.tensors)
    except RuntimeError as exc:
        raise ToyError(f"{path}/model.safetensors: does not match its config ({str(exc).splitlines()[0]})") from None
    model.eval()
    return TrainedSuperposition(config, model, ckpt.state)


# ------------------------------------------------------------------------------------------------
# Analysis
# ------------------------------------------------------------------------------------------------


def feature_geometry(W: torch.Tensor) -> dict:
    """The geometry of one instance's features from W (d_hidden, n_features), on the host as float64.

    norms ||W_i||; the overlaps (Ŵ_i·W_j)²; the interference Σ_{j≠i} (Ŵ_i·W_j)²; the dimensionality
    D_i = ||W_i||² / Σ_j (Ŵ_i·W_j)² (0 for a feature with W_i = 0); the stored features
    (||W_i|| > 0.5), the largest |cos| between two of them and their antipodal pairs (cos < -0.9)."""
    W = W.detach().to(HOST, torch.float64)
    norms = W.norm(dim=0)
    unit = W / norms.clamp_min(1e-12)
    overlaps = (unit.T @ W) ** 2  # [i, j] = (Ŵ_i · W_j)²
    total = overlaps.sum(dim=1)
    interference = total - overlaps.diagonal()
    dims = torch.where(norms > 1e-8, norms ** 2 / total.clamp_min(1e-24), torch.zeros_like(norms))
    stored = [i for i in range(W.shape[1]) if norms[i] > STORED_NORM]
    cos = unit.T @ unit
    max_cos, antipodal = 0.0, []
    for a, i in enumerate(stored):
        for j in stored[a + 1:]:
            max_cos = max(max_cos, abs(float(cos[i, j])))
            if cos[i, j] < ANTIPODAL_COS:
                antipodal.append([i, j])
    return {"norms": norms.tolist(), "interference": interference.tolist(), "dimensionality": dims.tolist(),
            "stored": stored, "n_stored": len(stored), "max_abs_cos": max_cos, "antipodal_pairs": antipodal,
            "sum_dimensionality": float(dims[stored].sum()) if stored else 0.0,
            "gram": (W.T @ W).tolist()}


@dataclass
class SuperpositionAnalysis:
    config: SuperpositionConfig
    summary: dict
    rows: list[dict]  # one per sparsity: the chosen (lowest held-out loss) instance's geometry

    def figures(self) -> dict[str, bytes]:
        if not hasattr(self, "_figures"):
            self._figures = {"superposition-phase.png": _png(phase_figure, self),
                             "superposition-dimensionality.png": _png(dimensionality_figure, self),
                             "superposition-interference.png": _png(interference_figure, self)}
        return self._figures

    def files(self) -> dict:
        return {name: (lambda path, data=data: Path(path).write_bytes(data)) for name, data in self.figures().items()}

    def sections(self) -> list:
        from ..report.page import Section

        figs = self.figures()
        imgs = "".join(f'<figure><img alt="{html.escape(name)}" style="max-width:100%" '
                       f'src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}"></figure>'
                       for name, data in figs.items())
        head = ("<tr><th>S</th><th>1&minus;S</th><th>loss</th><th>features stored</th><th>stored (by importance)</th>"
                "<th>max |cos| stored</th><th>antipodal pairs</th><th>&Sigma; D<sub>i</sub> stored</th>"
                "<th>dims / feature</th></tr>")
        body = "".join(
            f"<tr><td class='num'>{r['sparsity']:g}</td><td class='num'>{1 - r['sparsity']:.3g}</td>"
            f"<td class='num'>{r['loss']:.4g}</td><td class='num'>{r['n_stored']}</td>"
            f"<td>{html.escape(', '.join(map(str, r['stored'])))}</td><td class='num'>{r['max_abs_cos']:.3f}</td>"
            f"<td class='num'>{len(r['antipodal_pairs'])}</td><td class='num'>{r['sum_dimensionality']:.2f}</td>"
            f"<td class='num'>{_fmt_ratio(self.config.d_hidden, r['n_stored'])}</td></tr>" for r in self.rows)
        c, s = self.config, self.summary
        note = (f"<p class='note'>{c.n_features} features, {c.d_hidden} hidden dimensions, importance "
                f"{c.importance_decay:g}<sup>i</sup>, {c.instances_per_sparsity} instance(s) per sparsity trained "
                f"together for {s['steps']} steps; each row is the instance with the lowest held-out loss. A feature "
                f"is stored when ||W<sub>i</sub>|| &gt; {STORED_NORM}. D<sub>i</sub> = ||W<sub>i</sub>||&sup2; / "
                "&Sigma;<sub>j</sub>(Ŵ<sub>i</sub>&middot;W<sub>j</sub>)&sup2; is the fraction of a dimension "
                "feature i gets. Dense (S = 0): "
                f"{s['dense_n_stored']} stored, the {c.d_hidden} most important: {s['dense_top_m']}, max |cos| "
                f"{s['dense_max_abs_cos']:.3f}. Sparsest (S = {s['sparsest_sparsity']:g}): {s['sparsest_n_stored']} "
                "stored.</p>")
        table = f"<table>{head}{body}</table>"
        return [Section("superposition", "Superposition: features stored as sparsity grows", note + imgs + table)]


def _fmt_ratio(m: int, k: int) -> str:
    return f"{m / k:.2f}" if k else "n/a"


def analyze(trained: TrainedSuperposition, progress: bool = True) -> SuperpositionAnalysis:
    """Per sparsity: pick the instance with the lowest held-out loss and read its geometry."""
    config, model = trained.config, trained.model
    losses = eval_losses(model).to(HOST).tolist()
    per = config.instances_per_sparsity
    rows = []
    for k, sparsity in enumerate(config.sparsities):
        idx = list(range(k * per, (k + 1) * per))
        best = min(idx, key=lambda i: losses[i])
        geo = feature_geometry(model.W[best])
        rows.append({"sparsity": float(sparsity), "instance": best, "loss": losses[best],
                     "instance_losses": [losses[i] for i in idx],
                     "instance_n_stored": [int((model.W[i].detach().norm(dim=0) > STORED_NORM).sum()) for i in idx],
                     **geo})
    dense = rows[int(min(range(len(rows)), key=lambda k: rows[k]["sparsity"]))]
    sparse = rows[int(max(range(len(rows)), key=lambda k: rows[k]["sparsity"]))]
    m = config.d_hidden
    summary = {
        "steps": trained.state.step,
        "dense_sparsity": dense["sparsity"],
        "dense_n_stored": dense["n_stored"],
        "dense_top_m": dense["stored"] == list(range(m)),
        "dense_max_abs_cos": dense["max_abs_cos"],
        "sparsest_sparsity": sparse["sparsity"],
        "sparsest_n_stored": sparse["n_stored"],
        "sparsest_antipodal_pairs": len(sparse["antipodal_pairs"]),
        "superposition": sparse["n_stored"] > m,
        "n_stored_by_sparsity": {f"{r['sparsity']:g}": r["n_stored"] for r in rows},
        "rows": [{k: v for k, v in r.items() if k != "gram"} for r in rows],
    }
    return SuperpositionAnalysis(config, summary, rows)


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------


def _png(draw, analysis) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = draw(plt, analysis)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def phase_figure(plt, analysis: SuperpositionAnalysis):
    """Per sparsity: WᵀW (top) and each feature's norm, coloured by its interference (bottom)."""
    from matplotlib import cm, colors

    rows, n = analysis.rows, analysis.config.n_features
    fig, axes = plt.subplots(2, len(rows), figsize=(2.3 * len(rows) + 0.8, 5.6), squeeze=False,
                             gridspec_kw={"height_ratios": [1, 1.1]}, constrained_layout=True)
    lim = max(max(abs(v) for row in r["gram"] for v in row) for r in rows) or 1.0
    norm_i = colors.Normalize(0, 1)
    cmap = plt.get_cmap("plasma")
    for k, r in enumerate(rows):
        top, bottom = axes[0, k], axes[1, k]
        top.imshow(r["gram"], cmap="RdBu", vmin=-lim, vmax=lim)
        top.set_xticks([])
        top.set_yticks([])
        top.set_title(f"1−S = {1 - r['sparsity']:.3g}\n{r['n_stored']} stored", fontsize=9)
        # the fraction of a feature's squared overlaps that comes from others: 0 = a dimension of its own
        share = [i / (i + nm ** 2) if nm > 1e-8 else 0.0 for i, nm in zip(r["interference"], r["norms"])]
        bottom.barh(range(n), r["norms"], color=[cmap(norm_i(s)) for s in share])
        bottom.axvline(STORED_NORM, color="#999", lw=0.8, ls=":")
        bottom.set_ylim(n - 0.5, -0.5)
        bottom.set_xlim(0, max(1.2, max(r["norms"]) * 1.05))
        bottom.set_yticks([] if k else range(0, n, max(1, n // 10)))
        bottom.set_xlabel("||W_i||", fontsize=8)
        if k == 0:
            top.set_ylabel("WᵀW")
            bottom.set_ylabel("feature (by importance)")
    fig.colorbar(cm.ScalarMappable(norm=norm_i, cmap=cmap), ax=axes[1, :].tolist(), shrink=0.8,
                 label="interference share")
    fig.suptitle(f"Superposition: {analysis.config.n_features} features in {analysis.config.d_hidden} dimensions",
                 fontsize=11)
    return fig


def dimensionality_figure(plt, analysis: SuperpositionAnalysis):
    """Features stored, and each stored feature's dimensionality D_i, against 1 / (1 - S)."""
    rows, m = analysis.rows, analysis.config.d_hidden
    xs = [1 / (1 - r["sparsity"]) for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    left.plot(xs, [r["n_stored"] for r in rows], marker="o")
    left.axhline(m, color="#999", ls=":", lw=0.8, label=f"m = {m}")
    left.set_xscale("log")
    left.set_xlabel("1 / (1 − S)")
    left.set_ylabel("features stored (||W_i|| > 0.5)")
    left.legend()
    left.grid(alpha=0.3)
    for x, r in zip(xs, rows):
        d = [r["dimensionality"][i] for i in r["stored"]]
        right.scatter([x] * len(d), d, s=14, alpha=0.7, color="#2563eb")
    right.plot(xs, [m / r["n_stored"] if r["n_stored"] else float("nan") for r in rows], color="k", lw=1,
               label="m / features stored")
    for frac in (1, 1 / 2, 2 / 5, 1 / 3):
        right.axhline(frac, color="#bbb", lw=0.6, ls=":")
    right.set_xscale("log")
    right.set_ylim(0, 1.1)
    right.set_xlabel("1 / (1 − S)")
    right.set_ylabel("dimensionality D_i of stored features")
    right.legend()
    right.grid(alpha=0.3)
    return fig


def interference_figure(plt, analysis: SuperpositionAnalysis):
    """Each feature's norm against its interference Σ_{j≠i} (Ŵ_i·W_j)², a colour per sparsity."""
    rows = analysis.rows
    fig, ax = plt.subplots(figsize=(6, 4.2), constrained_layout=True)
    cmap = plt.get_cmap("viridis")
    for k, r in enumerate(rows):
        ax.scatter(r["interference"], r["norms"], s=16, alpha=0.8, color=cmap(k / max(1, len(rows) - 1)),
                   label=f"1−S = {1 - r['sparsity']:.3g}")
    ax.axhline(STORED_NORM, color="#999", lw=0.8, ls=":")
    ax.set_xlabel("interference Σ_{j≠i} (Ŵ_i·W_j)²")
    ax.set_ylabel("||W_i||")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig


TOY = Toy(name=NAME,
          description="Elhage et al. 2022: 20 sparse features in 5 dimensions, ReLU(WᵀWx + b); how many features "
                      "are stored, and in what geometry, as sparsity grows",
          config=SuperpositionConfig, train=train, load=load, analyze=analyze)
