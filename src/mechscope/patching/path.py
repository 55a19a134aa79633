"""Path patching (Wang et al. 2023; docs/method.md §9): how much of the metric flows from a set of
sender nodes S directly, through the residual stream, into a set of receiver inputs R.

The method as stated:
  1. run the clean prompt x;
  2. run x again with every sender's output taken from the reference (counterfactual x', mean or
     zero) while every other head and MLP output is frozen at its clean value; record R's inputs;
  3. run x with only R's inputs replaced by the recorded ones; read M.
Reported as noising, normalised: (M(x) - M_patched) / (M(x) - M(x')), 0 = no effect, 1 = the full
effect of the counterfactual.

How it is computed here. The residual stream a receiver reads is the sum of the outputs of the nodes
written before it (plus constant biases). In step 2 every non-sender output is frozen at its clean
value, so a receiver's recorded input is exactly its clean input plus the senders' changes that reach
it: in_R + sum over s in S written before R of (ref_s - clean_s). Step 2 therefore needs no forward
pass; the clean pass gives clean_s and in_R, the reference pass ref_s (graph.py's node outputs; with
post-sublayer norms a head's output under the frozen-scale split of attribution/post_norm.py).
Step 3 is one forward with R's inputs set (heads' q / k / v inputs through the per-head input hooks,
MLP inputs through hook_mlp_in, the logits' input at ln_final.hook_in); when every receiver is the
logits, step 3 is the final norm and unembedding of the patched last residual, without a forward.
Many sender sets (a sweep) share each step-3 forward by stacking copies of the batch, one per set.
tests/test_path_patching.py checks this against the three steps written out with plain hooks.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..attribution.references import check_ablation, counterfactual_pass, mean_reference, reference_outputs
from ..attribution.runner import StopForward, graph_hooks, prepare_model, unembed, check_ablatable
from ..behaviour import check_compatible
from ..data.dataset import Batch, PromptPairDataset
from ..devices import batch_size_for, model_device
from ..errors import MechscopeError, MechscopeWarning, ParameterError
from ..fileio import atomic_path
from ..graph import Graph
from ..metrics import Metric, compute_metric, metric_name, resolve_metric
from .names import Node, parse_receivers, parse_senders

SWEEP_KINDS = ("heads", "mlps")


class ResultFileError(MechscopeError, ValueError):
    """A patching result file that cannot be read."""


def save_result(path: str | os.PathLike, tensors: dict, meta: dict) -> Path:
    """Tensors as safetensors, everything else as JSON in its metadata; atomic."""
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"mechscope": json.dumps(meta)})
    return path


def load_result(path: str | os.PathLike, kind: str) -> tuple[dict, dict]:
    """(tensors, metadata) of a file `save_result` wrote for a result of `kind`."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("mechscope", "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise ResultFileError(f"{path}: not a readable result file ({exc})") from None
    if not isinstance(meta, dict) or meta.get("kind") != kind:
        raise ResultFileError(f"{path}: not a {kind} result (its metadata says {meta and meta.get('kind')!r})")
    return tensors, meta


@dataclass
class PathPatchingResult:
    """One row per sender set. `effect` [n_sets]: normalised noising effect of patching that set's paths
    to the receivers; `metric_patched` [n_sets, n_examples]; `metric_clean` and
    `metric_counterfactual` [n_examples]. A sweep also holds `grid`: [n_layers, n_heads] (heads) or
    [n_layers] (MLPs), the effects laid out by layer and head."""

    sender_sets: list[list[str]]
    receivers: list[str]
    ablation: str
    metric: str
    effect: torch.Tensor
    metric_patched: torch.Tensor
    metric_clean: torch.Tensor
    metric_counterfactual: torch.Tensor
    grid: torch.Tensor | None = None
    sweep: str | None = None
    info: dict = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return [",".join(s) if s else "(none)" for s in self.sender_sets]

    def top(self, k: int = 10) -> list[tuple[str, float]]:
        """The k sender sets with the largest |effect|, with their effects."""
        order = self.effect.abs().argsort(descending=True)[:k].tolist()
        return [(self.labels[i], float(self.effect[i])) for i in order]

    def save(self, path: str | os.PathLike) -> Path:
        tensors = {"effect": self.effect, "metric_patched": self.metric_patched, "metric_clean": self.metric_clean,
                   "metric_counterfactual": self.metric_counterfactual}
        if self.grid is not None:
            tensors["grid"] = self.grid
        meta = {"kind": "path_patching", "sender_sets": self.sender_sets, "receivers": self.receivers,
                "ablation": self.ablation, "metric": self.metric, "sweep": self.sweep, "info": self.info}
        return save_result(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PathPatchingResult":
        t, m = load_result(path, "path_patching")
        return cls(m["sender_sets"], m["receivers"], m["ablation"], m["metric"], t["effect"], t["metric_patched"],
                   t["metric_clean"], t["metric_counterfactual"], t.get("grid"), m.get("sweep"), m.get("info", {}))


def _repeat(batch: Batch, k: int) -> Batch:
    """k copies of `batch` stacked along the batch axis (copy i holds rows i*b .. (i+1)*b - 1)."""
    return Batch(**{name: v.repeat(k, *([1] * (v.dim() - 1))) for name, v in batch.__dict__.items()})


@torch.no_grad()
def _clean_inputs(model, graph: Graph, batch: Batch, receivers: list[Node]):
    """One clean pass: (node outputs [n_up, b, t, d], final logits [b, vocab], {receiver: clean input
    [b, t, d]}). A head's q / k / v input and an MLP's input are the residual stream the layer reads
    (the per-head input hooks hold copies of it); the logits' input is the final residual."""
    names = {}
    for r in receivers:
        if r.kind in ("q", "k", "v"):
            names[r] = f"blocks.{r.layer}.hook_resid_pre"
        elif r.kind == "mlp_in":
            names[r] = f"blocks.{r.layer}.hook_{'resid_pre' if graph.parallel_attn_mlp else 'resid_mid'}"
    seen: dict[str, torch.Tensor] = {}

    def keeper(name):
        def keep(value, hook=None):
            seen[name] = value.detach().clone()
            return value

        return keep

    with model.hooks(fwd_hooks=[(n, keeper(n)) for n in sorted(set(names.values()))]):
        with graph_hooks(model, graph, record_up=True, split_inputs=False, stop_at_final=True) as run:
            try:
                model(batch.clean, attention_mask=batch.attention_mask)
            except StopForward:
                pass
    inputs = {r: seen[n] for r, n in names.items()}
    for r in receivers:
        if r.kind == "logits":
            inputs[r] = run.final_residual.detach()
    logits = unembed(model, run.final_residual[torch.arange(len(batch.last), device=batch.last.device), batch.last])
    return run.up, logits, inputs


def _receiver_hooks(graph: Graph, receivers: list[Node], patched: dict[Node, torch.Tensor], state: dict):
    """Hooks that set each receiver's input to `patched[r]` ([k*b, t, d]); the logits' input is kept in
    `state['final']` and the pass stops there."""
    hooks = []
    by_hook: dict[str, list[Node]] = {}
    for r in receivers:
        name = {"q": "hook_q_input", "k": "hook_k_input", "v": "hook_v_input", "mlp_in": "hook_mlp_in"}.get(r.kind)
        if name is not None:
            by_hook.setdefault(f"blocks.{r.layer}.{name}", []).append(r)

    def setter(rs):
        def hook(value, hook=None):
            value = value.clone()  # the MLP-input hook hands over the residual stream itself
            for r in rs:
                if value.dim() == 4:  # [b, t, head, d]
                    value[:, :, r.head] = patched[r].to(value.dtype)
                else:
                    value = patched[r].to(value.dtype)
            return value

        return hook

    hooks += [(name, setter(rs)) for name, rs in by_hook.items()]
    logits_r = [r for r in receivers if r.kind == "logits"]

    def final(value, hook=None):
        if logits_r:
            value = patched[logits_r[0]].to(value.dtype)
        state["final"] = value
        raise StopForward

    hooks.append(("ln_final.hook_in", final))
    return hooks


def _set_weights(graph: Graph, sender_sets: list[list[Node]], receiver: Node, device) -> torch.Tensor:
    """[n_sets, n_up]: 1 where a set's sender writes before `receiver` reads (an edge of the graph)."""
    w = torch.zeros(len(sender_sets), graph.n_upstream, device=device)
    edge = graph.edge_mask[:, receiver.index(graph)]
    for i, senders in enumerate(sender_sets):
        for s in senders:
            u = s.index(graph)
            if edge[u]:
                w[i, u] = 1.0
    return w


@torch.no_grad()
def _patch_batch(model, graph: Graph, batch: Batch, sender_sets: list[list[Node]], receivers: list[Node],
                 ablation: str, mean, metric: Metric, chunk: int):
    """Metric values on one batch: (clean [b], counterfactual [b], patched [n_sets, b])."""
    clean_up, clean_logits, clean_in = _clean_inputs(model, graph, batch, receivers)
    cf_up, _, cf_logits = counterfactual_pass(model, graph, batch, attention=False)
    ref = cf_up if ablation == "counterfactual" else reference_outputs(model, graph, batch, ablation, clean_up, mean)
    delta = (ref - clean_up).to(clean_up.dtype)  # [n_up, b, t, d]
    del cf_up, ref
    m_clean = compute_metric(metric, clean_logits, batch, clean_logits=clean_logits).float()
    m_cf = compute_metric(metric, cf_logits, batch, clean_logits=clean_logits).float()
    b = batch.clean.shape[0]
    rows = torch.arange(b, device=batch.last.device)
    weights = {r: _set_weights(graph, sender_sets, r, delta.device).to(delta.dtype) for r in receivers}
    only_logits = all(r.kind == "logits" for r in receivers)
    out = []
    for start in range(0, len(sender_sets), chunk):
        stop = min(start + chunk, len(sender_sets))
        k = stop - start
        if only_logits:
            # Step 3 with the logits as the only receiver: the final norm and unembedding of the patched
            # last residual (the rest of the forward pass would recompute the clean run).
            r = receivers[0]
            last_delta = delta[:, rows, batch.last]  # [n_up, b, d]
            resid = clean_in[r][rows, batch.last][None] + torch.einsum("iu,ubd->ibd", weights[r][start:stop], last_delta)
            logits = unembed(model, resid.flatten(0, 1))
        else:
            patched = {}
            for r in receivers:
                change = torch.einsum("iu,ubtd->ibtd", weights[r][start:stop], delta)  # [k, b, t, d]
                patched[r] = (clean_in[r][None] + change).flatten(0, 1)
            big = _repeat(batch, k)
            state: dict = {}
            prepare_model(model, split_inputs=True)
            with model.hooks(fwd_hooks=_receiver_hooks(graph, receivers, patched, state)):
                try:
                    model(big.clean, attention_mask=big.attention_mask)
                except StopForward:
                    pass
            final = state["final"]
            logits = unembed(model, final[torch.arange(k * b, device=final.device), big.last])
        rep = _repeat(batch, k)
        values = compute_metric(metric, logits, rep, clean_logits=clean_logits.repeat(k, 1)).float()
        out.append(values.view(k, b))
    return m_clean, m_cf, torch.cat(out)


def _check_receivers(model, receivers: list[Node]) -> None:
    if any(r.kind in ("q", "k", "v") for r in receivers):
        check_ablatable(model)  # a head's own input needs the per-head input hooks


def path_patch_sets(model, dataset: PromptPairDataset, sender_sets, receivers, ablation: str = "counterfactual",
                    metric: Metric | None = None, batch_size: int | None = None, progress: bool = True,
                    _sweep: tuple[str, tuple] | None = None) -> PathPatchingResult:
    """Path patching for several sender sets at once (each a list of names or `Node`s); one effect per
    set. Receivers: names (see names.py) or `Node`s. See the module docstring for the method."""
    check_ablation(ablation)
    graph = Graph.from_model(model)
    sets = [s if s and isinstance(s[0], Node) else parse_senders(s, graph) for s in sender_sets]
    receivers = receivers if receivers and all(isinstance(r, Node) for r in receivers) else parse_receivers(receivers, graph)
    if not sets:
        raise ParameterError("no sender sets given")
    _check_receivers(model, receivers)
    check_compatible(model, dataset)
    metric = resolve_metric(metric, dataset)
    batch_size = batch_size_for(model, batch_size)
    device = model_device(model)
    mean = mean_reference(model, graph, dataset, batch_size) if ablation == "mean" else None
    only_logits = all(r.kind == "logits" for r in receivers)
    # Sender sets per step-3 forward: a forward holds about batch_size prompts (unbounded without one).
    chunk_sets = len(sets) if only_logits else max(1, batch_size // min(batch_size, len(dataset)))
    cols = {"clean": [], "cf": [], "patched": []}
    bar = tqdm(total=len(dataset), desc="path patching", unit="ex", disable=not progress)
    for _, batch in dataset.batches(batch_size):
        batch = batch.to(device)
        mc, mcf, mp = _patch_batch(model, graph, batch, sets, receivers, ablation, mean, metric, chunk_sets)
        cols["clean"].append(mc.cpu())
        cols["cf"].append(mcf.cpu())
        cols["patched"].append(mp.cpu())
        bar.update(len(batch.last))
    bar.close()
    clean, cf, patched = (torch.cat(cols[k], dim=-1) for k in ("clean", "cf", "patched"))
    denom = clean.mean() - cf.mean()
    if abs(float(denom)) < 1e-6:
        warnings.warn(f"the metric hardly differs between clean and counterfactual prompts ({float(denom):.3g}): "
                      "normalised effects are meaningless", MechscopeWarning, stacklevel=2)
    effect = (clean.mean() - patched.mean(-1)) / denom
    grid = None
    if _sweep is not None:
        grid = effect.reshape(*_sweep[1]).clone()
    return PathPatchingResult(
        sender_sets=[[s.name for s in ss] for ss in sets], receivers=[r.name for r in receivers],
        ablation=ablation, metric=metric_name(metric), effect=effect, metric_patched=patched,
        metric_clean=clean, metric_counterfactual=cf, grid=grid, sweep=_sweep[0] if _sweep else None,
        info={"n_examples": len(dataset), "graph": graph.spec()},
    )


def path_patch(model, dataset: PromptPairDataset, senders, receivers, ablation: str = "counterfactual",
               metric: Metric | None = None, batch_size: int | None = None, progress: bool = True) -> float:
    """The normalised effect (noising) of patching the paths from `senders` (all at once) to
    `receivers`, e.g. path_patch(model, data, ["a9.h6", "a10.h0"], ["logits"]). Names as in names.py;
    a comma-separated string is accepted for either."""
    result = path_patch_sets(model, dataset, [senders], receivers, ablation, metric, batch_size, progress)
    return float(result.effect[0])


def path_patch_sweep(model, dataset: PromptPairDataset, receivers, sender_kind: str = "heads",
                     ablation: str = "counterfactual", metric: Metric | None = None, batch_size: int | None = None,
                     progress: bool = True) -> PathPatchingResult:
    """Each head (or each MLP) as the only sender, in turn: the result's `grid` is [n_layers, n_heads]
    (or [n_layers]) of normalised effects on `receivers` (the figure of Wang et al. with receivers
    = logits)."""
    if sender_kind not in SWEEP_KINDS:
        raise ParameterError(f"unknown sweep '{sender_kind}'; choose one of {', '.join(SWEEP_KINDS)}")
    graph = Graph.from_model(model)
    if sender_kind == "heads":
        sets = [[Node("head", l, h)] for l in range(graph.n_layers) for h in range(graph.n_heads)]
        shape = (graph.n_layers, graph.n_heads)
    else:
        sets = [[Node("mlp", l)] for l in range(graph.n_layers)]
        shape = (graph.n_layers,)
    receivers = parse_receivers(receivers, graph) if not all(isinstance(r, Node) for r in receivers) else receivers
    return path_patch_sets(model, dataset, sets, receivers, ablation, metric, batch_size, progress,
                           _sweep=(sender_kind, shape))
