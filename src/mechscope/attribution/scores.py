"""Edge scores: a tensor over the graph's edges with what produced it, saved as safetensors + JSON.

`values` has shape [n_edges] for a non-positional method, or [n_spans, n_edges] for span-level
within-position scores (the schema names the spans).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..devices import HOST
from ..errors import MechscopeError
from ..fileio import atomic_path
from ..graph import Graph


class ScoresError(MechscopeError, ValueError):
    """A scores file that cannot be read or does not fit the model."""


@dataclass
class EdgeScores:
    graph: Graph
    values: torch.Tensor  # [n_edges] or [n_spans, n_edges]
    method: str
    metric: str
    ablation: str
    model: str
    n_examples: int
    spans: tuple[str, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)
    # PEAP only: crossing-edge scores per head and span pair ("k", "v": [layer, head, key span, query
    # span]; "q": [layer, head, query span]) and concrete token-edge counts per span edge
    # ("within": [span]; "crossing": [key span, query span]), averaged over examples.
    crossing: dict[str, torch.Tensor] = field(default_factory=dict)
    concrete: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def positional(self) -> bool:
        return self.values.dim() == 2

    def edge_scores(self) -> torch.Tensor:
        """[n_edges]: summed over spans for positional scores (equals the non-positional score)."""
        return self.values.sum(0) if self.positional else self.values

    def node_scores(self) -> torch.Tensor:
        """[n_upstream]: a node's score is the sum of its outgoing edges' scores (dM/dz_u is the sum of
        the gradients at every input it feeds)."""
        out = torch.zeros(self.graph.n_upstream, dtype=self.values.dtype, device=HOST)
        out.index_add_(0, self.graph.edge_up, self.edge_scores().cpu())
        return out

    def top_edges(self, k: int = 20) -> list[tuple[str, float]]:
        s = self.edge_scores()
        order = s.abs().argsort(descending=True)[:k]
        return [(self.graph.edge_name(int(e)), float(s[e])) for e in order]

    # Circuit selection lives in circuits.py (span circuits in span_circuits.py); these are the short
    # forms researchers reach for. Positional (PEAP) scores give span circuits over the span graph.
    def top_n(self, n: int, prune: bool = True):
        if self.positional:
            from ..circuits.span_circuit import span_top_n

            return span_top_n(self, n)
        from ..circuits.circuit import top_n

        return top_n(self, n, prune=prune)

    def threshold(self, value: float, prune: bool = True):
        if self.positional:
            raise NotImplementedError("threshold selection of span circuits: use top_n or greedy")
        from ..circuits.circuit import threshold

        return threshold(self, value, prune=prune)

    def greedy(self, n: int, attention: str = "scored"):
        if self.positional:
            from ..circuits.span_circuit import span_greedy

            return span_greedy(self, n, attention)
        from ..circuits.circuit import greedy

        return greedy(self, n)

    # ---------------------------------------------------------------------------------------------

    def metadata(self) -> dict:
        return {
            "format": "mechscope-edge-scores/1",
            "graph": self.graph.spec(),
            "method": self.method,
            "metric": self.metric,
            "ablation": self.ablation,
            "model": self.model,
            "n_examples": self.n_examples,
            "spans": list(self.spans),
            "info": self.info,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically: tensors in safetensors, everything else as JSON in its metadata."""
        path = Path(path)
        with atomic_path(path) as tmp:
            tensors = {"values": self.values.detach().cpu().contiguous()}
            tensors.update({f"crossing_{k}": v.detach().cpu().contiguous() for k, v in self.crossing.items()})
            tensors.update({f"concrete_{k}": v.detach().cpu().contiguous() for k, v in self.concrete.items()})
            save_file(
                tensors,
                str(tmp),
                metadata={"mechscope": json.dumps(self.metadata())},
            )
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EdgeScores":
        path = Path(path)
        if not path.is_file():
            raise ScoresError(f"{path}: no such scores file")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["mechscope"])
                values = f.get_tensor("values")
                extra = {name: f.get_tensor(name) for name in f.keys() if name != "values"}
        except Exception as exc:
            raise ScoresError(f"{path}: not a mechscope scores file ({type(exc).__name__}: {exc})") from None
        graph = Graph(**meta["graph"])
        if values.shape[-1] != graph.n_edges:
            raise ScoresError(f"{path}: {values.shape[-1]} scores for a graph of {graph.n_edges} edges")
        return cls(
            graph=graph,
            values=values,
            method=meta["method"],
            metric=meta["metric"],
            ablation=meta["ablation"],
            model=meta["model"],
            n_examples=meta["n_examples"],
            spans=tuple(meta.get("spans", ())),
            info=meta.get("info", {}),
            crossing={k[len("crossing_"):]: v for k, v in extra.items() if k.startswith("crossing_")},
            concrete={k[len("concrete_"):]: v for k, v in extra.items() if k.startswith("concrete_")},
        )
