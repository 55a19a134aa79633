"""Names of model components, as users write them: TransformerLens hook names or the graph's short
forms (docs/method.md §2).

Senders (things that write to the residual stream):
    embed / input                                       the token (and position) embedding
    a9.h6, blocks.9.attn.hook_z[head 6], ...hook_z[6]   head 6 of layer 9 (its output, z @ W_O)
    a9, blocks.9.attn.hook_z                            every head of layer 9
    m9, blocks.9.hook_mlp_out                           the MLP of layer 9
Receivers (things that read it):
    a9.h6.q / .k / .v                                   a head's query / key / value input
    a9.g2.k / .v                                        a key-value group's input (grouped-query attention)
    m9.in, blocks.9.hook_mlp_in                         an MLP's input
    logits, ln_final.hook_in                            the final residual stream

A `Node`'s `name` is the short form the graph uses (graph.py's upstream / downstream names), so a node
finds its row in the graph with `index(graph)`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ParameterError
from ..graph import Graph

SENDER_KINDS = ("embed", "head", "mlp")
RECEIVER_KINDS = ("q", "k", "v", "mlp_in", "logits")

SENDER_FORMS = "embed, a<L>.h<H>, a<L> (all heads of a layer), m<L>, blocks.<L>.attn.hook_z[<H>], blocks.<L>.hook_mlp_out"
RECEIVER_FORMS = "a<L>.h<H>.q|k|v, a<L>.g<G>.k|v, m<L>.in, logits, blocks.<L>.hook_mlp_in"


@dataclass(frozen=True)
class Node:
    """One component: kind (embed, head, mlp; q, k, v, mlp_in, logits), layer and head (the key-value
    group for k and v; None where it does not apply)."""

    kind: str
    layer: int | None = None
    head: int | None = None

    @property
    def name(self) -> str:
        if self.kind == "embed":
            return "input"
        if self.kind == "logits":
            return "logits"
        if self.kind == "head":
            return f"a{self.layer}.h{self.head}"
        if self.kind == "mlp":
            return f"m{self.layer}"
        if self.kind == "mlp_in":
            return f"m{self.layer}.in"
        if self.kind == "q":
            return f"a{self.layer}.h{self.head}.q"
        return f"a{self.layer}.g{self.head}.{self.kind}"

    @property
    def is_sender(self) -> bool:
        return self.kind in SENDER_KINDS

    def index(self, graph: Graph) -> int:
        """Row of this node among the graph's upstream (senders) or downstream (receivers) nodes."""
        names = graph.upstream_names if self.is_sender else graph.downstream_names
        return names.index(self.name)


_HOOK_Z = re.compile(r"blocks\.(\d+)\.attn\.hook_(?:z|result)(?:\[(?:head\s*)?(\d+)\])?")
_HEAD = re.compile(r"a(\d+)(?:\.h(\d+))?")
_MLP = re.compile(r"(?:m(\d+)|blocks\.(\d+)\.hook_mlp_out)")
_QKV = re.compile(r"a(\d+)\.([hg])(\d+)\.([qkv])|blocks\.(\d+)\.hook_([qkv])_input\[(?:head\s*)?(\d+)\]")
_MLP_IN = re.compile(r"m(\d+)\.in|blocks\.(\d+)\.hook_mlp_in")


def _layer(graph: Graph | None, layer: str, text: str) -> int:
    value = int(layer)
    if graph is not None and value >= graph.n_layers:
        raise ParameterError(f"'{text}': layer {value} is out of range; the model has layers 0-{graph.n_layers - 1}")
    return value


def _head(graph: Graph | None, head: str, text: str, n: int | None = None, what: str = "head") -> int:
    value = int(head)
    if graph is None:
        return value
    n = graph.n_heads if n is None else n
    if value >= n:
        raise ParameterError(f"'{text}': {what} {value} is out of range; each layer has {what}s 0-{n - 1}")
    return value


def _ranges(graph: Graph | None) -> str:
    if graph is None:
        return ""
    groups = f", key-value groups 0-{graph.n_kv_heads - 1}" if graph.n_kv_heads != graph.n_heads else ""
    return f" (layers 0-{graph.n_layers - 1}, heads 0-{graph.n_heads - 1}{groups})"


def parse_sender(text: str, graph: Graph | None) -> list[Node]:
    """The sender node(s) `text` names (a whole layer's heads for `a9`); ParameterError otherwise.
    Without a graph only the form is checked (a9 then gives one node with head None)."""
    s = text.strip()
    if s in ("embed", "input", "hook_embed", "blocks.0.hook_resid_pre"):
        return [Node("embed")]
    m = _HOOK_Z.fullmatch(s) or _HEAD.fullmatch(s)
    if m:
        layer = _layer(graph, m.group(1), s)
        if m.group(2) is None:
            return [Node("head", layer, h) for h in range(graph.n_heads)] if graph else [Node("head", layer)]
        return [Node("head", layer, _head(graph, m.group(2), s))]
    m = _MLP.fullmatch(s)
    if m:
        return [Node("mlp", _layer(graph, m.group(1) or m.group(2), s))]
    raise ParameterError(f"unknown sender '{text}'; senders are {SENDER_FORMS}{_ranges(graph)}")


def parse_receiver(text: str, graph: Graph | None) -> Node:
    """The receiver node `text` names; ParameterError otherwise (without a graph: its form only). With grouped-query attention a key or
    value input belongs to a key-value group, named a9.g2.k (a9.h6.k is refused: patching it changes
    the keys of every head of the group)."""
    s = text.strip()
    if s in ("logits", "ln_final.hook_in", "unembed"):
        return Node("logits")
    m = _QKV.fullmatch(s)
    if m:
        if m.group(1) is not None:
            layer_s, hg, idx, kind = m.group(1), m.group(2), m.group(3), m.group(4)
        else:
            layer_s, hg, idx, kind = m.group(5), None, m.group(7), m.group(6)
        layer = _layer(graph, layer_s, s)
        grouped = graph is not None and graph.n_kv_heads != graph.n_heads
        if kind == "q":
            if hg == "g":
                raise ParameterError(f"'{s}': a query input belongs to a head: write a{layer}.h{idx}.q")
            return Node("q", layer, _head(graph, idx, s))
        if hg == "g" or (hg is None and grouped):
            return Node(kind, layer, _head(graph, idx, s, graph and graph.n_kv_heads, "key-value group"))
        head = _head(graph, idx, s)
        if grouped:
            g = head // graph.group_size
            first = g * graph.group_size
            raise ParameterError(
                f"'{s}': this model shares keys and values between the heads of a group; name the group: "
                f"a{layer}.g{g}.{kind} (heads {first}-{first + graph.group_size - 1})")
        return Node(kind, layer, head)
    m = _MLP_IN.fullmatch(s)
    if m:
        return Node("mlp_in", _layer(graph, m.group(1) or m.group(2), s))
    raise ParameterError(f"unknown receiver '{text}'; receivers are {RECEIVER_FORMS}{_ranges(graph)}")


def _split(names) -> list[str]:
    if isinstance(names, str):
        names = names.split(",")
    return [n for n in (str(x).strip() for x in names) if n]


def parse_senders(names, graph: Graph | None) -> list[Node]:
    """Senders from a list of names or one comma-separated string; duplicates kept once, in order."""
    out: list[Node] = []
    for name in _split(names):
        out += [n for n in parse_sender(name, graph) if n not in out]
    return out


def parse_receivers(names, graph: Graph | None) -> list[Node]:
    """Receivers from a list of names or one comma-separated string; at least one."""
    out: list[Node] = []
    for name in _split(names):
        node = parse_receiver(name, graph)
        if node not in out:
            out.append(node)
    if not out:
        raise ParameterError(f"no receivers given; receivers are {RECEIVER_FORMS}")
    return out
