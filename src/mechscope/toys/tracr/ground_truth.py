"""Ground-truth circuits of compiled programs, read off tracr's craft model.

Every residual dimension of a tracr model is a labelled direction (`tokens:a`, `indices:2`, `one`, or
an SOp's value such as `hist:3`), and every craft block says which directions it reads and writes:
a head reads its query directions (`w_qk.left_space`), key directions (`w_qk.right_space`) and value
directions (`w_ov.input_space`) and writes `w_ov.output_space`; an MLP reads `fst.input_space` and
writes `snd.output_space`; the logits read the output SOp's directions. The input node writes the
token, position and `one` directions.

An edge u -> v of mechscope's graph is in the circuit when v reads a direction that u writes (and u
writes before v reads). A node (head or MLP) is in the circuit when one of its outgoing edges is.

Choices, documented because they decide what a method can be scored on:

* Reads of the constant directions are not circuit edges: `one` (every MLP's bias input and every
  head's BOS-fallback query) and `tokens:BOS` (the BOS-fallback key, and the value SelectorWidth
  aggregates). They hold the same value on every input, so they carry nothing about the input and no
  patching can change them.
* `restrict(varying)` gives the circuit of a task's contrast: the edges that carry at least one
  direction whose value differs between some clean and counterfactual prompt of the task into a
  node whose own output differs too (or into the logits). With clean and counterfactual prompts of
  equal length the position directions never differ, so reads of positions alone (a head selecting
  by index) drop out, as does a length computation when the lengths agree (its head reads the
  tokens, which differ, but computes the same value from them). The benchmark scores methods against this contrast circuit and reports the
  program's whole circuit beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...devices import HOST
from ...graph import Graph
from .compile import BOS, CompiledProgram

CONSTANT = ("one", f"tokens:{BOS}")


def _names(space) -> set[str]:
    return {str(d) for d in space.basis}


@dataclass
class GroundTruth:
    graph: Graph
    edges: torch.Tensor  # [n_edges] bool
    nodes: torch.Tensor  # [n_upstream] bool (the input node is never counted)
    edge_reads: dict[int, set[str]] = field(default_factory=dict)  # edge -> the directions it carries
    writes: dict[int, set[str]] = field(default_factory=dict)  # upstream node -> directions it writes

    def restrict(self, varying: set[str]) -> "GroundTruth":
        """The circuit of a contrast in which only the `varying` directions change: edges that carry
        a varying direction into a node whose own output varies (or into the logits)."""
        edges = torch.zeros_like(self.edges)
        reads = {}
        owners = self.graph.downstream_owner()  # [] for the logits
        for e, dirs in self.edge_reads.items():
            live = dirs & varying
            owner = owners[int(self.graph.edge_down[e])]
            if live and (not owner or any(self.writes.get(u, set()) & varying for u in owner)):
                edges[e] = True
                reads[e] = live
        return GroundTruth(self.graph, edges, _nodes_of(self.graph, edges), reads, self.writes)

    def edge_names(self) -> list[str]:
        return [self.graph.edge_name(int(e)) for e in self.edges.nonzero().flatten()]

    def node_names(self) -> list[str]:
        return [self.graph.upstream_names[int(u)] for u in self.nodes.nonzero().flatten()]

    def summary(self) -> dict:
        return {"n_edges": int(self.edges.sum()), "n_nodes": int(self.nodes.sum()),
                "edges": self.edge_names(), "nodes": self.node_names()}


def _nodes_of(graph: Graph, edges: torch.Tensor) -> torch.Tensor:
    nodes = torch.zeros(graph.n_upstream, dtype=torch.bool, device=HOST)
    nodes[graph.edge_up[edges]] = True
    nodes[0] = False  # the input node is in every circuit; it is not scored
    return nodes


def ground_truth(compiled: CompiledProgram) -> GroundTruth:
    """The program's circuit in `Graph.from_model(compiled.model)` indices."""
    from tracr.craft import transformers

    graph = Graph.from_model(compiled.model)
    writers: dict[str, list[int]] = {}
    readers: list[tuple[int, set[str]]] = []  # (downstream index, directions read)
    input_dirs = [l for l in compiled.residual_labels if l.startswith(("tokens:", "indices:")) or l == "one"]
    for d in input_dirs:
        writers.setdefault(d, []).append(0)
    for block, module in zip(compiled.craft_model.blocks, compiled.module_names):
        layer = int(module.split("/")[1].split("_")[1])
        if isinstance(block, transformers.MLP):
            u = graph.mlp_index(layer)
            readers.append((graph.mlp_in_index(layer), _names(block.fst.input_space)))
            for d in _names(block.snd.output_space):
                writers.setdefault(d, []).append(u)
            continue
        for h, head in enumerate(block.as_multi().heads()):
            u = graph.head_index(layer, h)
            readers.append((graph.q_slice(layer).start + h, _names(head.w_qk.left_space)))
            readers.append((graph.k_slice(layer).start + h, _names(head.w_qk.right_space)))
            readers.append((graph.v_slice(layer).start + h, _names(head.w_ov.input_space)))
            for d in _names(head.w_ov.output_space):
                writers.setdefault(d, []).append(u)
    out_dirs = {compiled.residual_labels[i] for i in compiled.model.W_U.abs().sum(1).nonzero().flatten().tolist()}
    readers.append((graph.logits_index, out_dirs))

    index = graph.dense(torch.arange(graph.n_edges, device=HOST), fill=-1)  # [n_up, n_down] edge index, -1: no edge
    edges = torch.zeros(graph.n_edges, dtype=torch.bool, device=HOST)
    edge_reads: dict[int, set[str]] = {}
    for v, dirs in readers:
        for d in dirs - set(CONSTANT):
            for u in writers.get(d, []):
                e = int(index[u, v])
                if e >= 0:  # u writes before v reads
                    edges[e] = True
                    edge_reads.setdefault(e, set()).add(d)
    writes: dict[int, set[str]] = {}
    for d, us in writers.items():
        for u in us:
            writes.setdefault(u, set()).add(d)
    return GroundTruth(graph, edges, _nodes_of(graph, edges), edge_reads, writes)


@torch.no_grad()
def varying_directions(compiled: CompiledProgram, clean: torch.Tensor, counterfactual: torch.Tensor,
                       attention_mask: torch.Tensor | None = None, tol: float = 1e-6) -> set[str]:
    """Residual directions whose value differs between clean and counterfactual prompts anywhere
    (tracr writes each SOp into its own directions, so this says which SOps the contrast changes)."""
    model = compiled.model
    final = []
    hooks = [("ln_final.hook_in", lambda x, hook=None: final.append(x) or x)]
    with model.hooks(fwd_hooks=hooks):
        model(clean, attention_mask=attention_mask)
        model(counterfactual, attention_mask=attention_mask)
    diff = (final[0] - final[1]).abs()
    if attention_mask is not None:
        diff = diff * attention_mask[..., None].to(diff)  # dtype and device of the model's stream
    changed = diff.flatten(0, 1).amax(0) > tol
    return {compiled.residual_labels[i] for i in changed.nonzero().flatten().tolist()}
