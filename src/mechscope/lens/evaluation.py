"""Evaluating lenses: per layer, the mean KL(final || lens) over the positions of held-out text, and
the top-k predictions of each lens at each layer and position of a prompt. Both results save to JSON
(the KL table also to CSV) and load back."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..devices import HOST, model_device
from ..errors import check_count
from ..fileio import atomic_path, write_json
from .logit_lens import LensError, decode, kl_to_final, residuals, streams
from .tuned_lens import TunedLens

LENSES = ("logit", "tuned")


def _lenses(tuned: TunedLens | None, model) -> dict[str, TunedLens | None]:
    if tuned is not None:
        if not isinstance(tuned, TunedLens):
            raise LensError(f"tuned must be a TunedLens, got {type(tuned).__name__}")
        tuned.check_fits(model)
    return {"logit": None} if tuned is None else {"logit": None, "tuned": tuned}


def _decode(model, lens: TunedLens | None, index: int, h: torch.Tensor) -> torch.Tensor:
    return decode(model, h) if lens is None else lens.decode(model, index, h)


@dataclass
class LensEvaluation:
    """Mean KL(final || lens) in nats per stream ("embed", "0" ... "L-1") for each lens."""

    model: str
    streams: list[str]
    kl: dict[str, list[float]]
    n_positions: int
    text: dict = field(default_factory=dict)

    def rows(self) -> list[dict]:
        return [{"layer": s, **{f"kl_{name}": values[i] for name, values in self.kl.items()}}
                for i, s in enumerate(self.streams)]

    def save(self, path: str | os.PathLike) -> Path:
        return write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LensEvaluation":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(**data)
        except (OSError, ValueError, TypeError) as exc:
            raise LensError(f"{path}: not a lens evaluation ({exc})") from None

    def save_csv(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        rows = self.rows()
        with atomic_path(path) as tmp:
            with tmp.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        return path


@torch.no_grad()
def evaluate_lenses(model, tokens: torch.Tensor, tuned: TunedLens | None = None, *, batch_size: int = 4,
                    progress: bool = True, text: dict | None = None) -> LensEvaluation:
    """Per stream, the mean KL(final || lens) over every non-BOS position of `tokens` ([n, length]),
    for the logit lens and (when given) the tuned lens."""
    check_count("batch_size", batch_size)
    lenses = _lenses(tuned, model)
    names = [s for s, _ in streams(model)]
    sums = {k: torch.zeros(len(names), dtype=torch.float64, device=HOST) for k in lenses}
    count = 0
    for start in tqdm(range(0, len(tokens), batch_size), desc="evaluating lenses", disable=not progress):
        batch = tokens[start:start + batch_size].to(model_device(model))
        resid = residuals(model, batch)[:, :, 1:]  # position 0 (BOS) is left out
        resid = resid.reshape(resid.shape[0], -1, resid.shape[-1])
        final = torch.log_softmax(decode(model, resid[-1]).float(), dim=-1)
        for name, lens in lenses.items():
            for i in range(len(names)):
                sums[name][i] += kl_to_final(final, _decode(model, lens, i, resid[i])).double().sum().to(HOST)
        count += resid.shape[1]
    return LensEvaluation(model=str(getattr(model, "mechscope_name", model.cfg.model_name)), streams=names,
                          kl={k: (v / count).tolist() for k, v in sums.items()}, n_positions=count,
                          text=dict(text or {}))


@dataclass
class LensPredictions:
    """The top-k tokens of each lens at each stream and position of a prompt:
    top[lens][stream][position] = [[token string, probability], ...], most probable first."""

    model: str
    prompt: str
    tokens: list[str]
    streams: list[str]
    k: int
    top: dict[str, list[list[list[list]]]]

    def save(self, path: str | os.PathLike) -> Path:
        return write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LensPredictions":
        try:
            return cls(**json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as exc:
            raise LensError(f"{path}: not a lens predictions file ({exc})") from None


@torch.no_grad()
def lens_predictions(model, prompt: str, tuned: TunedLens | None = None, k: int = 5) -> LensPredictions:
    """Top-`k` predictions of the logit lens (and the tuned lens, when given) for every stream and
    position of `prompt` (BOS first, as the model expects)."""
    check_count("k", k)
    if not isinstance(prompt, str) or not prompt.strip():
        raise LensError("the prompt is empty")
    lenses = _lenses(tuned, model)
    tokens = model.to_tokens(prompt)
    resid = residuals(model, tokens)[:, 0]  # [streams, pos, d]
    names = [s for s, _ in streams(model)]
    top = {}
    for name, lens in lenses.items():
        per_stream = []
        for i in range(len(names)):
            probs = torch.softmax(_decode(model, lens, i, resid[i]).float(), dim=-1)
            p, ids = probs.topk(min(k, probs.shape[-1]), dim=-1)
            p, ids = p.to(HOST).tolist(), ids.to(HOST).tolist()
            per_stream.append([[[model.tokenizer.decode([t]), round(q, 6)] for t, q in zip(ids[j], p[j])]
                               for j in range(len(ids))])
        top[name] = per_stream
    return LensPredictions(model=str(getattr(model, "mechscope_name", model.cfg.model_name)), prompt=prompt,
                           tokens=[model.tokenizer.decode([t]) for t in tokens[0].tolist()], streams=names, k=k,
                           top=top)


def kl_figure(evaluation: LensEvaluation, path: str | os.PathLike) -> Path:
    """A PNG of the mean KL(final || lens) per layer, one line per lens, on a log axis (the last
    layer's logit lens is the model's output, KL 0, and is left off the log axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=120)
    x = list(range(len(evaluation.streams)))
    for name, values in evaluation.kl.items():
        pts = [(i, v) for i, v in zip(x, values) if v > 0]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=f"{name} lens")
    ax.set_yscale("log")
    step = max(1, -(-len(x) // 16))  # at most 16 labels
    ax.set_xticks(x[::step], [evaluation.streams[i] for i in x[::step]])
    ax.set_xlabel("layer (residual stream after it; embed = the embedding)")
    ax.set_ylabel("KL(final || lens), nats")
    ax.set_title(f"{evaluation.model}: {evaluation.n_positions:,} held-out positions", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
