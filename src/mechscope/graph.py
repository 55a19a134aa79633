"""The computational graph of a transformer (docs/method.md §2).

Upstream nodes write to the residual stream: the input embedding, every attention head (its
`hook_result`) and every MLP (`hook_mlp_out`). Downstream nodes read it: every head's query input,
every key-value head's key and value input (grouped-query attention shares k/v inputs between the
query heads of a group), every MLP input and the logits (the final residual).

An edge u -> v exists when u has written before v reads. Sublayers are ordered by a step counter:
the input writes at step 0; attention of layer l reads at 2l and writes at 2l+1; the MLP reads at 2l+1
and writes at 2l+2 (both read at 2l in parallel-attention models); the logits read at 2L. Then u -> v
is an edge iff write_step(u) <= read_step(v).

Models with a norm after each sublayer (Gemma 2 / 3) have the same graph: their heads' writes are
split by holding the post-attention norm's scale fixed (attribution/post_norm.py).

Edges are numbered in row-major order of the [n_upstream, n_downstream] validity mask, so a dense
score matrix `S[u, v]` and a score vector `s[e]` over edges convert with `edge_up`/`edge_down`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .devices import HOST
from .errors import MechscopeError


class GraphError(MechscopeError, ValueError):
    """A graph that does not match a model, or an unsupported architecture."""


@dataclass(frozen=True)
class Graph:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    parallel_attn_mlp: bool = False
    # Derived tables, filled in __post_init__.
    upstream_names: tuple[str, ...] = field(init=False, repr=False, compare=False)
    downstream_names: tuple[str, ...] = field(init=False, repr=False, compare=False)
    upstream_write_step: torch.Tensor = field(init=False, repr=False, compare=False)
    downstream_read_step: torch.Tensor = field(init=False, repr=False, compare=False)
    edge_mask: torch.Tensor = field(init=False, repr=False, compare=False)  # [n_up, n_down] bool
    edge_up: torch.Tensor = field(init=False, repr=False, compare=False)  # [n_edges] upstream index of each edge
    edge_down: torch.Tensor = field(init=False, repr=False, compare=False)  # [n_edges] downstream index

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise GraphError(f"{self.n_heads} heads do not divide into {self.n_kv_heads} key-value groups")
        up, up_step = ["input"], [0]
        down, down_step = [], []
        for l in range(self.n_layers):
            for h in range(self.n_heads):
                up.append(f"a{l}.h{h}")
                up_step.append(2 * l + 1)
            up.append(f"m{l}")
            up_step.append(2 * l + 2)
            mlp_read = 2 * l if self.parallel_attn_mlp else 2 * l + 1
            for h in range(self.n_heads):
                down.append(f"a{l}.h{h}.q")
                down_step.append(2 * l)
            for kind in ("k", "v"):
                for g in range(self.n_kv_heads):
                    down.append(f"a{l}.g{g}.{kind}")
                    down_step.append(2 * l)
            down.append(f"m{l}.in")
            down_step.append(mlp_read)
        down.append("logits")
        down_step.append(2 * self.n_layers)
        put = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        put("upstream_names", tuple(up))
        put("downstream_names", tuple(down))
        put("upstream_write_step", torch.tensor(up_step, device=HOST))
        put("downstream_read_step", torch.tensor(down_step, device=HOST))
        mask = self.upstream_write_step[:, None] <= self.downstream_read_step[None, :]
        put("edge_mask", mask)
        up_idx, down_idx = mask.nonzero(as_tuple=True)
        put("edge_up", up_idx)
        put("edge_down", down_idx)

    # ---------------------------------------------------------------------------------------------

    @classmethod
    def from_model(cls, model) -> "Graph":
        cfg = model.cfg
        n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
        return cls(
            n_layers=cfg.n_layers,
            n_heads=cfg.n_heads,
            n_kv_heads=n_kv,
            parallel_attn_mlp=bool(getattr(cfg, "parallel_attn_mlp", False)),
        )

    @property
    def n_upstream(self) -> int:
        return len(self.upstream_names)

    @property
    def n_downstream(self) -> int:
        return len(self.downstream_names)

    @property
    def n_edges(self) -> int:
        return int(self.edge_up.numel())

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    def describe(self) -> dict:
        return {
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "n_upstream_nodes": self.n_upstream,
            "n_downstream_nodes": self.n_downstream,
            "n_edges": self.n_edges,
        }

    def spec(self) -> dict:
        """The constructor arguments, for files that record which graph they belong to."""
        return {"n_layers": self.n_layers, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads,
                "parallel_attn_mlp": self.parallel_attn_mlp}

    @classmethod
    def from_spec(cls, spec) -> "Graph":
        """The graph a file records with `spec()`; GraphError naming the field when it is malformed."""
        if not isinstance(spec, dict):
            raise GraphError(f"field 'graph' must be a JSON object, not {type(spec).__name__}")
        unknown = sorted(set(spec) - {"n_layers", "n_heads", "n_kv_heads", "parallel_attn_mlp"})
        if unknown:
            raise GraphError(f"field 'graph': unknown fields {unknown}")
        for key in ("n_layers", "n_heads", "n_kv_heads"):
            value = spec.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GraphError(f"field 'graph': '{key}' must be a positive integer, not {value!r}")
        parallel = spec.get("parallel_attn_mlp", False)
        if not isinstance(parallel, bool):
            raise GraphError(f"field 'graph': 'parallel_attn_mlp' must be true or false, not {parallel!r}")
        return cls(**spec)

    def differences(self, other: "Graph") -> list[str]:
        """What differs between this graph's shape and `other`'s, e.g. ["key-value heads 4 vs 2"]
        (this graph's value first); empty when they have the same shape."""
        out = [f"{what} {a} vs {b}" for what, a, b in (
            ("layers", self.n_layers, other.n_layers),
            ("heads per layer", self.n_heads, other.n_heads),
            ("key-value heads per layer", self.n_kv_heads, other.n_kv_heads),
        ) if a != b]
        if self.parallel_attn_mlp != other.parallel_attn_mlp:
            kind = lambda g: "parallel" if g.parallel_attn_mlp else "sequential"  # noqa: E731
            out.append(f"attention and MLP {kind(self)} vs {kind(other)}")
        return out

    def same_shape(self, other: "Graph") -> bool:
        return (self.n_layers, self.n_heads, self.n_kv_heads, self.parallel_attn_mlp) == (
            other.n_layers,
            other.n_heads,
            other.n_kv_heads,
            other.parallel_attn_mlp,
        )

    # ---------------------------------------------------------------------------------------------
    # Index helpers
    # ---------------------------------------------------------------------------------------------

    def head_index(self, layer: int, head: int) -> int:
        """Upstream index of head `head` in `layer`."""
        return 1 + layer * (self.n_heads + 1) + head

    def mlp_index(self, layer: int) -> int:
        """Upstream index of the MLP of `layer`."""
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    def upstream_slice(self, layer: int) -> slice:
        """Upstream indices of the heads of `layer` (contiguous)."""
        start = self.head_index(layer, 0)
        return slice(start, start + self.n_heads)

    def _layer_down_start(self, layer: int) -> int:
        return layer * (self.n_heads + 2 * self.n_kv_heads + 1)

    def q_slice(self, layer: int) -> slice:
        s = self._layer_down_start(layer)
        return slice(s, s + self.n_heads)

    def k_slice(self, layer: int) -> slice:
        s = self._layer_down_start(layer) + self.n_heads
        return slice(s, s + self.n_kv_heads)

    def v_slice(self, layer: int) -> slice:
        s = self._layer_down_start(layer) + self.n_heads + self.n_kv_heads
        return slice(s, s + self.n_kv_heads)

    def mlp_in_index(self, layer: int) -> int:
        return self._layer_down_start(layer) + self.n_heads + 2 * self.n_kv_heads

    @property
    def logits_index(self) -> int:
        return self.n_downstream - 1

    def n_upstream_before(self, read_step: int) -> int:
        """How many upstream nodes (a prefix of the order) have written by `read_step`."""
        return int((self.upstream_write_step <= read_step).sum())

    def downstream_owner(self) -> list[list[int]]:
        """For each downstream node, the upstream nodes whose computation reads it.

        q input of head h -> [head h]; k/v input of group g -> the heads of group g; MLP input ->
        [the MLP]; logits -> [] (the output of the graph).
        """
        owners: list[list[int]] = []
        for l in range(self.n_layers):
            owners += [[self.head_index(l, h)] for h in range(self.n_heads)]
            for _ in ("k", "v"):
                for g in range(self.n_kv_heads):
                    owners.append([self.head_index(l, g * self.group_size + i) for i in range(self.group_size)])
            owners.append([self.mlp_index(l)])
        owners.append([])
        return owners

    def dense(self, edge_values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Scatter a [..., n_edges] vector into a dense [..., n_up, n_down] matrix."""
        out = torch.full(
            (*edge_values.shape[:-1], self.n_upstream, self.n_downstream),
            fill,
            dtype=edge_values.dtype,
            device=edge_values.device,
        )
        out[..., self.edge_up, self.edge_down] = edge_values
        return out

    def edge_name(self, e: int) -> str:
        return f"{self.upstream_names[int(self.edge_up[e])]}->{self.downstream_names[int(self.edge_down[e])]}"
