"""Edge scores: a tensor over the graph's edges with what produced it, saved as safetensors + JSON.

`values` has shape [n_edges] for a non-positional method, or [n_spans, n_edges] for span-level
within-position scores (the schema names the spans).

File format `mechscope-edge-scores/2` stores PEAP's per-key query edges (crossing_q with the same shape
as crossing_k). Format /1 files, and files scored with `query_edges="whole_row"`, hold whole-row query
edges (crossing_q [layer, head, query span]); they load as such (`EdgeScores.query_edges`).
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

from ..data.dataset import parse_json_object
from ..devices import HOST
from ..errors import MechscopeError
from ..fileio import atomic_path
from ..graph import Graph, GraphError


class ScoresError(MechscopeError, ValueError):
    """A scores file that cannot be read or does not fit the model."""


SCORES_FORMAT = "mechscope-edge-scores/2"


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
    # PEAP only: crossing-edge scores per head and span pair ("k", "v", "q": [layer, head, key span,
    # query span]; whole-row query edges "q": [layer, head, query span]) and concrete token-edge
    # counts per span edge ("within": [span]; "crossing": [key span, query span]), averaged over examples.
    crossing: dict[str, torch.Tensor] = field(default_factory=dict)
    concrete: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def positional(self) -> bool:
        return self.values.dim() == 2

    @property
    def query_edges(self) -> str | None:
        """`per_key` or `whole_row` for PEAP scores (by the shape of crossing["q"]), else None."""
        if "q" not in self.crossing:
            return None
        return "whole_row" if self.crossing["q"].dim() == 3 else "per_key"

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
        """The edges (span edges for positional scores) with |score| >= value, a finite number >= 0."""
        if self.positional:
            from ..circuits.span_circuit import span_threshold

            return span_threshold(self, value, prune=prune)
        from ..circuits.circuit import threshold

        return threshold(self, value, prune=prune)

    def greedy(self, n: int, attention: str = "scored"):
        if self.positional:
            from ..circuits.span_circuit import span_greedy

            return span_greedy(self, n, attention)
        from ..circuits.circuit import greedy

        return greedy(self, n)

    def to_frame(self):
        """Every edge of the scores' span graph as a pandas DataFrame, one row per edge: edge, parent,
        child, type, parent_span, child_span, key_span, score, concrete (circuits/exports.py)."""
        from ..circuits.exports import scores_frame

        return scores_frame(self)

    # ---------------------------------------------------------------------------------------------

    def metadata(self) -> dict:
        return {
            "format": SCORES_FORMAT,
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
        if path.is_dir():
            raise ScoresError(f"{path}: is a directory, not a scores file")
        if not path.is_file():
            raise ScoresError(f"{path}: no such scores file")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = (f.metadata() or {}).get("mechscope")
                values = f.get_tensor("values")
                extra = {name: f.get_tensor(name) for name in f.keys() if name != "values"}
        except Exception as exc:  # safetensors raises its own error types for a damaged file
            raise ScoresError(f"{path}: not a mechscope scores file ({type(exc).__name__}: {exc})") from None
        meta = _metadata(path, header)
        try:
            graph = Graph.from_spec(meta["graph"])
        except GraphError as exc:
            raise ScoresError(f"{path}: metadata {exc}") from None
        if values.dim() not in (1, 2) or values.shape[-1] != graph.n_edges:
            raise ScoresError(f"{path}: scores of shape {list(values.shape)} for a graph of {graph.n_edges} edges")
        spans = tuple(meta.get("spans", ()))
        if values.dim() == 2 and values.shape[0] != len(spans):
            raise ScoresError(f"{path}: {values.shape[0]} rows of span scores for {len(spans)} spans in the metadata")
        crossing = {k[len("crossing_"):]: v for k, v in extra.items() if k.startswith("crossing_")}
        _check_crossing(path, crossing, meta)
        return cls(
            graph=graph,
            values=values,
            method=meta["method"],
            metric=meta["metric"],
            ablation=meta["ablation"],
            model=meta["model"],
            n_examples=meta["n_examples"],
            spans=spans,
            info=meta.get("info", {}),
            crossing=crossing,
            concrete={k[len("concrete_"):]: v for k, v in extra.items() if k.startswith("concrete_")},
        )


# The metadata's fields: (type, what it must be); `spans` and `info` may be missing.
_METADATA = {
    "graph": (dict, "a JSON object"),
    "method": (str, "a string"),
    "metric": (str, "a string"),
    "ablation": (str, "a string"),
    "model": (str, "a string"),
    "n_examples": (int, "an integer"),
    "spans": (list, "a list of span names"),
    "info": (dict, "a JSON object"),
}


def _check_crossing(path: Path, crossing: dict[str, torch.Tensor], meta: dict) -> None:
    """ScoresError unless the crossing tensors (if any) are k, v, q with k and v [layer, head, key span,
    query span] and q either the same (per-key) or [layer, head, query span] (whole-row, format /1)."""
    if not crossing:
        return
    if set(crossing) != {"k", "v", "q"}:
        raise ScoresError(f"{path}: crossing scores {sorted(crossing)}, expected k, v and q")
    k, q = crossing["k"].shape, crossing["q"].shape
    if len(k) != 4 or crossing["v"].shape != k or q not in (k, k[:2] + k[3:]):
        raise ScoresError(f"{path}: crossing scores of shapes k {list(k)}, v {list(crossing['v'].shape)}, q "
                          f"{list(q)}; expected k = v = [layer, head, key span, query span] and q the same "
                          "(per-key query edges) or [layer, head, query span] (whole-row)")
    wanted = "whole_row" if len(q) == 3 else "per_key"
    said = meta.get("info", {}).get("query_edges", wanted)
    if said != wanted:
        raise ScoresError(f"{path}: metadata says query_edges '{said}' but crossing_q has the shape of {wanted} edges")


def _metadata(path: Path, header: str | None) -> dict:
    """The `mechscope` metadata of a scores file, each field checked for its type."""
    if header is None:
        raise ScoresError(f"{path}: not a mechscope scores file (no 'mechscope' metadata)")
    meta = parse_json_object(header, f"{path}: metadata 'mechscope'", ScoresError)
    for key, (kind, what) in _METADATA.items():
        if key not in meta:
            if key in ("spans", "info"):
                continue
            raise ScoresError(f"{path}: metadata is missing field '{key}'")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise ScoresError(f"{path}: metadata field '{key}' must be {what}")
    return meta
