"""The result of an activation patching sweep: per-example values over the sweep's axes, what produced
them, and a safetensors + JSON file form (docs/method.md §9)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import MechscopeError
from ..fileio import atomic_path

FORMAT_VERSION = 1


class PatchResultError(MechscopeError, ValueError):
    """A patching result file that cannot be read (missing, damaged, or not a mechscope result)."""


@dataclass
class PatchResult:
    """Activation patching values.

    values: [example, *axes] normalised effects (0 = no effect, 1 = the full clean-vs-counterfactual
    effect; see `sweep.patch_sweep`); raw: [example, *axes] the patched metric M_patched itself;
    axes: axis names, e.g. ("layer", "position") or ("layer", "head", "position"); labels: one list of
    labels per axis ("L3", "a3.h2", span names or tokens); metric_clean / metric_counterfactual:
    [example] M(x) and M(x'); meta: component, direction, reference, metric, model, task, positions,
    n_examples, and anything else that describes the run (an `estimate` entry marks attribution
    patching results).
    """

    values: torch.Tensor
    raw: torch.Tensor
    axes: tuple[str, ...]
    labels: tuple[tuple[str, ...], ...]
    metric_clean: torch.Tensor
    metric_counterfactual: torch.Tensor
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.axes = tuple(self.axes)
        self.labels = tuple(tuple(str(x) for x in axis) for axis in self.labels)
        shape = tuple(self.values.shape[1:])
        if tuple(self.raw.shape) != tuple(self.values.shape):
            raise PatchResultError(f"raw {list(self.raw.shape)} and values {list(self.values.shape)} differ in shape")
        if len(self.axes) != len(shape) or len(self.labels) != len(shape):
            raise PatchResultError(f"values of shape {list(self.values.shape)} need {len(shape)} axes and label lists, "
                                   f"got {len(self.axes)} axes and {len(self.labels)} label lists")
        for name, labels, n in zip(self.axes, self.labels, shape):
            if len(labels) != n:
                raise PatchResultError(f"axis '{name}' has {n} entries but {len(labels)} labels")
        for name in ("metric_clean", "metric_counterfactual"):
            if tuple(getattr(self, name).shape) != (self.values.shape[0],):
                raise PatchResultError(f"{name} must have one value per example ({self.values.shape[0]})")

    @property
    def n_examples(self) -> int:
        return int(self.values.shape[0])

    @property
    def mean(self) -> torch.Tensor:
        """[*axes] the normalised effect of the example means (a ratio of means, as §6 does for
        faithfulness: steadier than the mean of per-example ratios when an example's clean and
        counterfactual metrics are close)."""
        clean, cf = self.metric_clean.double().mean(), self.metric_counterfactual.double().mean()
        patched = self.raw.double().mean(0)
        if self.meta.get("direction") == "denoising":
            out = (patched - cf) / (clean - cf)
        else:
            out = (clean - patched) / (clean - cf)
        return out.float()

    def to_frame(self):
        """A pandas long table: one row per (example, cell) with each axis's index and label, the
        normalised value and the raw metric."""
        import pandas as pd

        shape = tuple(self.values.shape)
        idx = torch.stack(torch.meshgrid(*[torch.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, len(shape))
        cols = {"example": idx[:, 0].numpy()}
        for a, name in enumerate(self.axes):
            cols[name] = idx[:, a + 1].numpy()
            cols[f"{name}_label"] = [self.labels[a][i] for i in idx[:, a + 1].tolist()]
        cols["value"] = self.values.reshape(-1).float().numpy()
        cols["raw"] = self.raw.reshape(-1).float().numpy()
        return pd.DataFrame(cols)

    def metadata(self) -> dict:
        return {"mechscope_patching": FORMAT_VERSION, "axes": list(self.axes), "labels": [list(x) for x in self.labels],
                "meta": self.meta}

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: tensors in safetensors, axes, labels and metadata as JSON in its header."""
        path = Path(path)
        tensors = {name: getattr(self, name).detach().cpu().float().contiguous()
                   for name in ("values", "raw", "metric_clean", "metric_counterfactual")}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"mechscope": json.dumps(self.metadata())})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PatchResult":
        path = Path(path)
        if path.is_dir():
            raise PatchResultError(f"{path}: is a directory, not a patching result file")
        if not path.is_file():
            raise PatchResultError(f"{path}: no such patching result file")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = (f.metadata() or {}).get("mechscope")
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as exc:  # safetensors raises its own error types for a damaged file
            raise PatchResultError(f"{path}: not a mechscope patching result ({type(exc).__name__}: {exc})") from None
        if header is None:
            raise PatchResultError(f"{path}: not a mechscope patching result (no 'mechscope' metadata)")
        try:
            meta = json.loads(header)
        except json.JSONDecodeError as exc:
            raise PatchResultError(f"{path}: metadata 'mechscope' is not JSON ({exc.msg})") from None
        if not isinstance(meta, dict) or meta.get("mechscope_patching") != FORMAT_VERSION:
            raise PatchResultError(f"{path}: not a mechscope patching result (metadata field 'mechscope_patching' "
                                   f"should be {FORMAT_VERSION})")
        for key, kind in (("axes", list), ("labels", list), ("meta", dict)):
            if not isinstance(meta.get(key), kind):
                raise PatchResultError(f"{path}: metadata field '{key}' is missing or not a JSON {kind.__name__}")
        missing = [n for n in ("values", "raw", "metric_clean", "metric_counterfactual") if n not in tensors]
        if missing:
            raise PatchResultError(f"{path}: missing tensor(s) {', '.join(missing)}")
        try:
            return cls(tensors["values"], tensors["raw"], tuple(meta["axes"]), tuple(meta["labels"]),
                       tensors["metric_clean"], tensors["metric_counterfactual"], meta["meta"])
        except (PatchResultError, TypeError) as exc:
            raise PatchResultError(f"{path}: {exc}") from None
