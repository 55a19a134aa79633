"""Activation patching sweeps over one component kind (docs/method.md §9).

A sweep patches every instance of one component kind, one at a time, in every example, and reads the
metric. Component kinds and their instances (TransformerLens hook names):

    resid_pre, resid_post   blocks.l.hook_resid_pre / hook_resid_post    (layer, position)
    attn_out, mlp_out       blocks.l.hook_attn_out / hook_mlp_out         (layer, position)
    z                       blocks.l.attn.hook_z, one head at every position   (layer, head)
    z_pos                   blocks.l.attn.hook_z, one head at one position     (layer, head, position)
    q                       blocks.l.attn.hook_q, one query head, every position  (layer, head)
    k, v                    blocks.l.attn.hook_k / hook_v: with grouped-query attention one KEY-VALUE
                            head (shared by n_heads / n_kv_heads query heads), every position  (layer, head)
    pattern                 blocks.l.attn.hook_pattern, one head's whole pattern  (layer, head)

Positions: with `positions="span"` (the default) a position is a span of the dataset's schema and
patching it patches every token of that span in each example (examples may differ in length; a span
that is empty in an example is a patch of nothing there, effect 0). With `positions="token"` a
position is a token index; every example must then have the same length.

Directions: **noising** runs the clean prompt x and takes the component from the reference (what is
necessary); **denoising** runs the counterfactual prompt x' and takes it from the clean run (what is
sufficient; the reference is then the counterfactual by definition). References for noising:
`counterfactual` (the paired x'), `mean` (the mean over the reference set's clean prompts, per span or,
with positions="token", per token), `zero`, `resample` (the clean activation of another example with
the same layout, a seeded permutation; see `resample_partners`).

Normalised values: denoising (M_patched − M(x')) / (M(x) − M(x')), noising (M(x) − M_patched) /
(M(x) − M(x')); the raw M_patched is kept too.

Batching. For one layer l, all (example, instance) patches of a batch of examples share the run's
input up to block l: the residual stream entering block l is recorded once (one forward of the base
prompts) and every patch runs only blocks l..L-1 from it, many patches to a forward (the batch axis
holds patches). Blocks before l are not run at all: they are made pass-throughs for that forward while
the bridge's `start_at_layer` swaps the cached residual in at block l (so position ids, rotary tables
and masks are the model's own). The pass stops at the final residual and unembeds the last position
only. `naive_sweep` is the one-forward-per-patch baseline with a plain hook, for tests and benchmarks.
"""

from __future__ import annotations

import math

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..attribution.runner import StopForward, unembed
from ..behaviour import check_compatible
from ..data.dataset import Batch, PromptPairDataset
from ..devices import HOST, model_device
from ..errors import ParameterError, check_count
from ..metrics import Metric, compute_metric, final_logits, metric_name, resolve_metric
from .result import PatchResult

# kind -> (hook name inside block l, instance shape: "pos", "head", "kv_head", "head_pos", "pattern")
COMPONENTS = {
    "resid_pre": ("hook_resid_pre", "pos"),
    "resid_post": ("hook_resid_post", "pos"),
    "attn_out": ("hook_attn_out", "pos"),
    "mlp_out": ("hook_mlp_out", "pos"),
    "z": ("attn.hook_z", "head"),
    "z_pos": ("attn.hook_z", "head_pos"),
    "q": ("attn.hook_q", "head"),
    "k": ("attn.hook_k", "kv_head"),
    "v": ("attn.hook_v", "kv_head"),
    "pattern": ("attn.hook_pattern", "head"),
}
DIRECTIONS = ("noising", "denoising")
REFERENCES = ("counterfactual", "mean", "zero", "resample")
POSITIONS = ("span", "token")


class PatchingError(ParameterError):
    """A patching request that cannot be run (unknown component, direction or reference, a layer or
    head out of range, a reference that does not fit the dataset)."""


def _choice(what: str, value: str, options) -> str:
    if value not in options:
        raise PatchingError(f"unknown {what} '{value}'; choose one of {', '.join(options)}")
    return value


@dataclass
class SweepSpec:
    """A checked sweep request (everything `patch_sweep` validates before any model work)."""

    component: str
    direction: str
    reference: str
    positions: str
    layers: list[int]
    heads: list[int] | None  # None: all heads (or key-value heads) of the component

    @property
    def hook(self) -> str:
        return COMPONENTS[self.component][0]

    @property
    def shape(self) -> str:
        return COMPONENTS[self.component][1]

    def name(self, layer: int) -> str:
        return f"blocks.{layer}.{self.hook}"


def n_heads_of(model, component: str) -> int:
    if COMPONENTS[component][1] == "kv_head":
        return int(getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads)
    return int(model.cfg.n_heads)


def check_sweep(model, dataset: PromptPairDataset, component: str, direction: str = "noising",
                reference: str = "counterfactual", positions: str = "span", layers=None, heads=None,
                reference_data: PromptPairDataset | None = None) -> SweepSpec:
    """PatchingError for a request that cannot run, before any model work; else the SweepSpec."""
    _choice("component", component, COMPONENTS)
    _choice("direction", direction, DIRECTIONS)
    _choice("reference", reference, REFERENCES)
    _choice("positions", positions, POSITIONS)
    if direction == "denoising" and reference != "counterfactual":
        raise PatchingError(f"denoising runs the counterfactual prompt and patches in clean activations, so its "
                            f"reference is the counterfactual; reference '{reference}' is for noising")
    n_layers = int(model.cfg.n_layers)
    layers = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    for l in layers:
        if not 0 <= l < n_layers:
            raise PatchingError(f"layer {l} is out of range: the model has layers 0..{n_layers - 1}")
    if len(set(layers)) != len(layers) or not layers:
        raise PatchingError(f"layers must be distinct and at least one, got {layers}")
    if heads is not None:
        if COMPONENTS[component][1] == "pos":
            raise PatchingError(f"component '{component}' has no heads; heads apply to z, z_pos, q, k, v, pattern")
        n = n_heads_of(model, component)
        heads = [int(h) for h in heads]
        for h in heads:
            if not 0 <= h < n:
                what = "key-value heads" if COMPONENTS[component][1] == "kv_head" else "heads"
                raise PatchingError(f"head {h} is out of range: '{component}' has {what} 0..{n - 1}")
        if len(set(heads)) != len(heads) or not heads:
            raise PatchingError(f"heads must be distinct and at least one, got {heads}")
    if len(dataset) == 0:
        raise PatchingError("the dataset has no examples")
    if positions == "token":
        lengths = sorted({len(ex) for ex in dataset.examples})
        if len(lengths) > 1:
            raise PatchingError(f"positions='token' needs examples of one length, these have lengths {lengths}; "
                                "use positions='span' (the schema's spans align examples of different lengths)")
    if reference == "mean" and component == "pattern" and positions == "span":
        raise PatchingError("the mean reference of 'pattern' is a per-token mean: it needs positions='token' "
                            "(examples of one length)")
    ref = dataset if reference_data is None else reference_data
    if reference in ("mean", "resample") and positions == "token":
        lengths = sorted({len(ex) for ex in ref.examples} | {len(dataset.examples[0])})
        if len(lengths) > 1:
            raise PatchingError(f"the {reference} reference with positions='token' needs reference examples of the "
                                f"dataset's length; lengths {lengths}")
    if reference_data is not None and tuple(reference_data.schema.spans) != tuple(dataset.schema.spans):
        raise PatchingError("the reference data has another schema than the dataset")
    if reference == "resample":
        resample_partners(dataset, reference_data, seed=0)  # raises when no aligned permutation exists
    return SweepSpec(component, direction, reference, positions, layers, heads)


def _layout(ex) -> tuple:
    return (len(ex.clean), tuple(ex.span_starts))


def resample_partners(dataset: PromptPairDataset, reference_data: PromptPairDataset | None = None,
                      seed: int = 0) -> list[int]:
    """For each example, the index of the reference example whose clean activations replace its own.

    Partners must have the same layout (token length and span starts), so the patch is token-aligned.
    From the dataset itself (`reference_data` None) the partners are a seeded permutation within each
    group of examples of one layout with no example its own partner; from another reference set, a
    seeded draw without replacement among its examples of the same layout. PatchingError when the
    reference set is shorter than the dataset or a layout has too few partners."""
    own = reference_data is None
    ref = dataset if own else reference_data
    if len(ref) < len(dataset):
        raise PatchingError(f"the resample reference has {len(ref)} examples, fewer than the dataset's "
                            f"{len(dataset)}: every example needs its own partner")
    g = torch.Generator(device=HOST).manual_seed(int(seed))
    groups: dict[tuple, list[int]] = {}
    for i, ex in enumerate(ref.examples):
        groups.setdefault(_layout(ex), []).append(i)
    need: dict[tuple, list[int]] = {}
    for i, ex in enumerate(dataset.examples):
        need.setdefault(_layout(ex), []).append(i)
    out = [0] * len(dataset)
    for layout, members in need.items():
        pool = groups.get(layout, [])
        if own:
            if len(pool) < 2:
                raise PatchingError(f"resample: example {members[0]} (length {layout[0]}) has no other example of "
                                    f"the same length and span layout to take activations from; use a reference "
                                    f"set with such examples, positions of one template, or another reference")
            order = torch.randperm(len(pool), generator=g, device=HOST).tolist()
            cycle = [pool[k] for k in order]  # one cycle through the group: nobody is their own partner
            for k, i in enumerate(cycle):
                out[i] = cycle[(k + 1) % len(cycle)]
        else:
            if len(pool) < len(members):
                raise PatchingError(f"resample: the reference set has {len(pool)} examples of length {layout[0]} "
                                    f"with the dataset's span layout, the dataset needs {len(members)}")
            order = torch.randperm(len(pool), generator=g, device=HOST).tolist()
            for k, i in enumerate(members):
                out[i] = pool[order[k]]
    return out


# ------------------------------------------------------------------------------------------------
# Axes and patch masks
# ------------------------------------------------------------------------------------------------


def position_groups(dataset: PromptPairDataset, indices, width: int, positions: str, device) -> torch.Tensor:
    """[batch, P, width] bool: which tokens of each example make position P (a span, or a token)."""
    exs = [dataset.examples[i] for i in indices]
    if positions == "token":
        n = len(exs[0])
        eye = torch.eye(n, width, dtype=torch.bool, device=device)
        return eye[None].expand(len(exs), -1, -1)
    n_spans = len(dataset.schema)
    span_of = torch.full((len(exs), width), -1, dtype=torch.long, device=device)
    for b, ex in enumerate(exs):
        span_of[b, : len(ex)] = torch.tensor(ex.span_of_positions(), dtype=torch.long, device=device)
    return span_of[:, None, :] == torch.arange(n_spans, device=device)[None, :, None]


def axes_of(model, dataset: PromptPairDataset, spec: SweepSpec) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]:
    """(axis names, labels) of a sweep's values after the example axis."""
    layer_labels = tuple(f"L{l}" for l in spec.layers)
    if spec.positions == "span":
        pos_labels = tuple(dataset.schema.spans)
    else:
        toks = dataset.examples[0].clean
        pos_labels = tuple(f"{t}:{model.tokenizer.decode([tok])}" for t, tok in enumerate(toks))
    heads = spec.heads if spec.heads is not None else list(range(n_heads_of(model, spec.component)))
    prefix = "kv" if spec.shape == "kv_head" else "h"
    head_labels = tuple(f"{prefix}{h}" for h in heads)
    if spec.shape == "pos":
        return ("layer", "position"), (layer_labels, pos_labels)
    if spec.shape == "head_pos":
        return ("layer", "head", "position"), (layer_labels, head_labels, pos_labels)
    return ("layer", "head"), (layer_labels, head_labels)


class _Instances:
    """The patches of one layer for a batch of examples: flat row r = (example b, instance i), with the
    mask of the activation's entries each row replaces (broadcastable to the hook's tensor without the
    batch axis)."""

    def __init__(self, spec: SweepSpec, groups: torch.Tensor, heads: list[int], n_heads: int):
        self.spec, self.groups, self.heads, self.n_heads = spec, groups, heads, n_heads
        self.batch, self.n_pos, self.width = groups.shape
        self.device = groups.device
        shape = spec.shape
        self.cells = (self.n_pos,) if shape == "pos" else (len(heads), self.n_pos) if shape == "head_pos" else (len(heads),)
        self.n = math.prod(self.cells)
        self.heads_t = torch.tensor(heads, dtype=torch.long, device=self.device)

    def nonempty(self) -> torch.Tensor:
        """[batch, n] whether the patch touches any entry (an empty span patches nothing)."""
        any_pos = self.groups.any(-1)  # [batch, P]
        if self.spec.shape == "pos":
            return any_pos
        if self.spec.shape == "head_pos":
            return any_pos[:, None, :].expand(-1, len(self.heads), -1).reshape(self.batch, -1)
        return torch.ones(self.batch, self.n, dtype=torch.bool, device=self.device)

    def masks(self, b: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        shape = self.spec.shape
        if shape == "pos":
            return self.groups[b, i][:, :, None]  # [R, t, 1]
        head_hot = torch.nn.functional.one_hot(self.heads_t[i // (self.n_pos if shape == "head_pos" else 1)],
                                               self.n_heads).bool()  # [R, h]
        if shape == "head_pos":
            return (self.groups[b, i % self.n_pos][:, :, None] & head_hot[:, None, :])[..., None]  # [R, t, h, 1]
        if self.spec.component == "pattern":
            return head_hot[:, :, None, None]  # [R, h, 1, 1]
        return head_hot[:, None, :, None]  # [R, 1, h, 1]


# ------------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------------


@contextmanager
def skip_blocks(model, n: int):
    """Inside, blocks 0..n-1 of the bridge pass their input through without computing anything: with
    `start_at_layer=n` the forward then costs only blocks n..L-1 (block n swaps the caller's residual in,
    so whatever the skipped blocks hand on is discarded). The blocks' own forward is restored on exit."""
    def passthrough(*args, **kwargs):
        return args[0] if args else kwargs["hidden_states"]

    done = []
    try:
        for block in list(model.blocks)[:n]:
            object.__setattr__(block, "forward", passthrough)  # the bridge's setattr would forward it on
            done.append(block)
        yield
    finally:
        for block in done:
            object.__delattr__(block, "forward")


def _rows(batch: Batch, idx: torch.Tensor) -> Batch:
    return Batch(**{k: v[idx] for k, v in batch.__dict__.items()})


def _final_hook(store: dict):
    def hook(value, hook=None):
        store["final"] = value
        raise StopForward

    return hook


def last_logits(model, tokens_or_resid, attention_mask, last, hooks, start_at_layer: int | None = None):
    """Run (from `start_at_layer`, skipping the blocks before it, when given) with `hooks` and return the
    logits at each row's last token [rows, vocab]: the pass stops at the final residual and only the last
    positions are unembedded."""
    store: dict = {}
    hooks = list(hooks) + [("ln_final.hook_in", _final_hook(store))]
    with model.hooks(fwd_hooks=hooks):
        try:
            if start_at_layer is None:
                model(tokens_or_resid, attention_mask=attention_mask)
            else:
                with skip_blocks(model, start_at_layer):
                    model(tokens_or_resid, start_at_layer=start_at_layer, attention_mask=attention_mask)
        except StopForward:
            pass
    final = store["final"]
    return unembed(model, final[torch.arange(final.shape[0], device=final.device), last])


def _capture(model, tokens, attention_mask, last, names: list[str]) -> tuple[dict, torch.Tensor]:
    """Activations at `names` (detached) and the last-token logits of one forward."""
    acts: dict = {}

    def keep(name):  # stored under the name asked for (the bridge's hook may carry an alias's target)
        def hook(value, hook=None):
            acts[name] = value.detach()
            return value

        return hook

    logits = last_logits(model, tokens, attention_mask, last, [(n, keep(n)) for n in dict.fromkeys(names)])
    return acts, logits


def _span_mean(acts: torch.Tensor, groups: torch.Tensor, token_axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position-group sums [P, *rest] and counts [P] of activations [batch, ..., t, ...]."""
    x = acts.movedim(token_axis, 1)  # [b, t, *rest]
    g = groups.to(x.dtype)  # [b, P, t]
    return torch.einsum("bpt,bt...->p...", g, x), g.sum((0, 2))


@torch.no_grad()
def mean_activations(model, spec: SweepSpec, data: PromptPairDataset, batch_size: int) -> dict[int, torch.Tensor]:
    """layer -> the mean clean activation per position group [P, *rest] (per span, or per token); for
    `pattern` (token positions only) the mean pattern [heads, t, t]."""
    device = model_device(model)
    names = [spec.name(l) for l in spec.layers]
    sums: dict = {}
    total = None
    for idx, batch in data.batches(batch_size):
        batch = batch.to(device)
        acts, _ = _capture(model, batch.clean, batch.attention_mask, batch.last, names)
        groups = position_groups(data, idx, batch.clean.shape[1], spec.positions, device)
        for l, name in zip(spec.layers, names):
            s = acts[name].sum(0) if spec.component == "pattern" else _span_mean(acts[name], groups, 1)[0]
            sums[l] = s if l not in sums else sums[l] + s
        c = torch.tensor(float(len(idx)), device=device) if spec.component == "pattern" else groups.sum((0, 2)).float()
        total = c if total is None else total + c
    out = {}
    for l, s in sums.items():
        shape = (-1,) + (1,) * (s.dim() - 1)
        out[l] = s / total if spec.component == "pattern" else s / total.clamp(min=1).reshape(shape).to(s.dtype)
    return out


def _expand_mean(mean: torch.Tensor, spec: SweepSpec, groups: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-group mean [P, *rest] spread over each example's tokens, shaped like `like` [b, ...]."""
    if spec.component == "pattern":
        return mean[None].expand_as(like)
    x = torch.einsum("bpt,p...->bt...", groups.to(mean.dtype), mean)  # tokens of no group (padding): 0
    return x.to(like.dtype)


def sources(model, spec: SweepSpec, data: PromptPairDataset, idx: list[int], batch: Batch, clean_acts: dict,
            groups: torch.Tensor, mean: dict | None, partners: list[int] | None,
            reference_data: PromptPairDataset | None) -> dict[int, torch.Tensor]:
    """layer -> the activation each patch takes [batch, ...] for this batch of examples."""
    names = {l: spec.name(l) for l in spec.layers}
    if spec.direction == "denoising":
        return dict(clean_acts)
    if spec.reference == "counterfactual":
        acts, _ = _capture(model, batch.counterfactual, batch.attention_mask, batch.last, list(names.values()))
        return {l: acts[n] for l, n in names.items()}
    if spec.reference == "zero":
        return {l: torch.zeros_like(a) for l, a in clean_acts.items()}
    if spec.reference == "mean":
        return {l: _expand_mean(mean[l], spec, groups, a) for l, a in clean_acts.items()}
    ref = data if reference_data is None else reference_data
    rb = ref.batch([partners[i] for i in idx]).to(batch.clean.device)
    acts, _ = _capture(model, rb.clean, rb.attention_mask, rb.last, list(names.values()))
    out = {}
    for l, n in names.items():
        a = acts[n]
        width = batch.clean.shape[1]  # partners share each example's length; pad widths may differ
        axis = 2 if spec.component == "pattern" else 1
        if a.shape[axis] != width:
            a = a.narrow(axis, 0, width) if a.shape[axis] > width else torch.nn.functional.pad(
                a, _pad_spec(a.dim(), axis, width - a.shape[axis]))
            if spec.component == "pattern":
                a = a.narrow(3, 0, width) if a.shape[3] > width else torch.nn.functional.pad(a, (0, width - a.shape[3]))
        out[l] = a
    return out


def _pad_spec(ndim: int, axis: int, extra: int) -> tuple[int, ...]:
    spec = [0] * (2 * (ndim - axis))
    spec[-1] = extra
    return tuple(spec)


def _normalise(raw: torch.Tensor, clean: torch.Tensor, cf: torch.Tensor, direction: str) -> torch.Tensor:
    shape = (-1,) + (1,) * (raw.dim() - 1)
    c, x = clean.reshape(shape), cf.reshape(shape)
    return (raw - x) / (c - x) if direction == "denoising" else (c - raw) / (c - x)


@dataclass
class _Base:
    """What a batch of examples shares across layers: metrics, the base run's residual entering each
    layer, the clean run's activations at the component, the position masks."""

    batch: Batch
    clean_logits: torch.Tensor
    m_clean: torch.Tensor
    m_cf: torch.Tensor
    resid: dict  # layer -> [b, t, d] entering block l on the base run (clean: noising; x': denoising)
    clean_acts: dict  # layer -> the component's activation on the clean run
    groups: torch.Tensor

    @property
    def metric(self) -> torch.Tensor:
        """M on the run the patches are made in (clean for noising, x' for denoising)."""
        return self.m_clean if self.base_is_clean else self.m_cf


def _prepare(model, spec: SweepSpec, dataset, idx, batch, metric) -> _Base:
    device = batch.clean.device
    comp = {l: spec.name(l) for l in spec.layers}
    resid = {l: f"blocks.{l}.hook_resid_pre" for l in spec.layers}
    noising = spec.direction == "noising"
    clean_acts, clean_logits = _capture(model, batch.clean, batch.attention_mask, batch.last,
                                        list(comp.values()) + (list(resid.values()) if noising else []))
    cf_acts, cf_logits = _capture(model, batch.counterfactual, batch.attention_mask, batch.last,
                                  [] if noising else list(resid.values()))
    m_clean = compute_metric(metric, clean_logits, batch, clean_logits=clean_logits)
    m_cf = compute_metric(metric, cf_logits, batch, clean_logits=clean_logits)
    base_acts = clean_acts if noising else cf_acts
    groups = position_groups(dataset, idx, batch.clean.shape[1], spec.positions, device)
    out = _Base(batch, clean_logits, m_clean, m_cf, {l: base_acts[n] for l, n in resid.items()},
                {l: clean_acts[n] for l, n in comp.items()}, groups)
    out.base_is_clean = noising
    return out


def patch_sweep(model, dataset: PromptPairDataset, component: str = "z_pos", direction: str = "noising",
                reference: str = "counterfactual", positions: str = "span", metric: Metric | None = None,
                layers=None, heads=None, batch_size: int = 16, patch_batch: int = 256, seed: int = 0,
                reference_data: PromptPairDataset | None = None, progress: bool = True) -> PatchResult:
    """Exact activation patching of every instance of `component` (see the module docstring), batched:
    `batch_size` examples at a time, `patch_batch` patches to a forward pass, each starting at its layer
    from the cached residual. Returns a PatchResult with values [example, layer, ...]."""
    spec = check_sweep(model, dataset, component, direction, reference, positions, layers, heads, reference_data)
    batch_size, patch_batch = check_count("batch_size", batch_size), check_count("patch_batch", patch_batch)
    check_compatible(model, dataset)
    metric = resolve_metric(metric, dataset)
    device = model_device(model)
    heads_list = spec.heads if spec.heads is not None else list(range(n_heads_of(model, component)))
    n_heads = n_heads_of(model, component)
    partners = resample_partners(dataset, reference_data, seed) if reference == "resample" else None
    mean = mean_activations(model, spec, reference_data or dataset, batch_size) if reference == "mean" else None
    axes, labels = axes_of(model, dataset, spec)
    raw_parts, clean_parts, cf_parts = [], [], []
    # Data-parallel runs (distributed.py): each rank patches its shard of the examples; the per-example
    # results are gathered in dataset order.
    bar = tqdm(total=distributed.shard_size(len(dataset)) * len(spec.layers), desc=f"patching {component}",
               unit="ex-layer", disable=not distributed.progress_enabled(progress))
    with torch.no_grad(), distributed.together():
        for idx, batch in distributed.batches(dataset, batch_size):
            batch = batch.to(device)
            base = _prepare(model, spec, dataset, idx, batch, metric)
            src = sources(model, spec, dataset, idx, batch, base.clean_acts, base.groups, mean, partners,
                          reference_data)
            inst = _Instances(spec, base.groups, heads_list, n_heads)
            raw = base.metric[:, None, None].expand(-1, len(spec.layers), inst.n).clone()
            live = inst.nonempty().reshape(-1).nonzero().flatten()  # flat rows b * n + i
            for li, l in enumerate(spec.layers):
                resid = base.resid[l]
                for start in range(0, len(live), patch_batch):
                    rows = live[start:start + patch_batch]
                    b, i = rows // inst.n, rows % inst.n
                    mask, value = inst.masks(b, i), src[l][b]
                    hook = (spec.name(l), lambda x, hook=None, m=mask, v=value: torch.where(m, v.to(x.dtype), x))
                    logits = last_logits(model, resid[b], batch.attention_mask[b], batch.last[b], [hook], l)
                    m = compute_metric(metric, logits, _rows(batch, b), clean_logits=base.clean_logits[b])
                    raw[b, li, i] = m.to(raw.dtype)
                bar.update(len(idx))
            raw_parts.append(raw.reshape(len(idx), len(spec.layers), *inst.cells).cpu())
            clean_parts.append(base.m_clean.cpu())
            cf_parts.append(base.m_cf.cpu())
    bar.close()
    if distributed.active():
        raw_parts, clean_parts, cf_parts = ([distributed.all_gather_cat(torch.cat(parts))]
                                            for parts in (raw_parts, clean_parts, cf_parts))
    return _result(spec, raw_parts, clean_parts, cf_parts, axes, labels, model, dataset, metric, seed)


def _result(spec, raw_parts, clean_parts, cf_parts, axes, labels, model, dataset, metric, seed, extra=None):
    raw = torch.cat(raw_parts).float()
    clean, cf = torch.cat(clean_parts).float(), torch.cat(cf_parts).float()
    values = _normalise(raw, clean, cf, spec.direction)
    meta = {"component": spec.component, "direction": spec.direction, "reference": spec.reference,
            "positions": spec.positions, "metric": metric_name(metric), "task": dataset.task,
            "model": str(getattr(model.cfg, "model_name", "") or ""), "n_examples": len(dataset),
            "layers": spec.layers, "heads": spec.heads, "seed": int(seed)}
    meta.update(extra or {})
    return PatchResult(values, raw, axes, labels, clean, cf, meta)


# ------------------------------------------------------------------------------------------------
# The naive baseline: one forward pass per patch, a plain hook
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def naive_sweep(model, dataset: PromptPairDataset, component: str = "z_pos", direction: str = "noising",
                reference: str = "counterfactual", positions: str = "span", metric: Metric | None = None,
                layers=None, heads=None, seed: int = 0, reference_data: PromptPairDataset | None = None,
                cells: list[tuple] | None = None, progress: bool = True) -> PatchResult:
    """The same sweep computed the slow, plain way: every patch is its own full forward of one example
    (no padding, no cached prefix) with a hook that overwrites the patched entries; sources come from
    `run_with_cache` of each example alone. `cells`: (example, layer index, *instance indices) to compute
    (others are NaN), for subsampled timing."""
    spec = check_sweep(model, dataset, component, direction, reference, positions, layers, heads, reference_data)
    metric = resolve_metric(metric, dataset)
    device = model_device(model)
    heads_list = spec.heads if spec.heads is not None else list(range(n_heads_of(model, component)))
    axes, labels = axes_of(model, dataset, spec)
    shape = (len(dataset), len(spec.layers)) + tuple(len(x) for x in labels[1:])
    raw = torch.full(shape, float("nan"), device=HOST)
    partners = resample_partners(dataset, reference_data, seed) if reference == "resample" else None
    ref = reference_data or dataset
    mean = _naive_means(model, spec, ref) if reference == "mean" else None
    m_clean = torch.empty(len(dataset), device=HOST)
    m_cf = torch.empty(len(dataset), device=HOST)
    todo = cells if cells is not None else [tuple(c) for c in torch.cartesian_prod(
        *[torch.arange(n, device=HOST) for n in shape]).reshape(-1, len(shape)).tolist()]
    by_example: dict[int, list] = {}
    for c in todo:
        by_example.setdefault(int(c[0]), []).append(tuple(int(x) for x in c))
    bar = tqdm(total=len(todo), desc="naive patching", unit="patch", disable=not progress)
    for e in range(len(dataset)):
        ex = dataset.examples[e]
        one = dataset.batch([e]).to(device)
        clean_logits = final_logits(model(one.clean), one.last)
        cf_logits = final_logits(model(one.counterfactual), one.last)
        m_clean[e] = compute_metric(metric, clean_logits, one, clean_logits=clean_logits)[0].cpu()
        m_cf[e] = compute_metric(metric, cf_logits, one, clean_logits=clean_logits)[0].cpu()
        if e not in by_example:
            continue
        run_on = one.clean if direction == "noising" else one.counterfactual
        src_tokens = {"counterfactual": one.counterfactual, "resample": None}.get(reference)
        if direction == "denoising":
            src_tokens = one.clean
        elif reference == "resample":
            src_tokens = ref.batch([partners[e]]).clean.to(device)
        cache = model.run_with_cache(src_tokens)[1] if src_tokens is not None else None
        spans = ex.span_of_positions()
        for c in by_example[e]:
            l = spec.layers[c[1]]
            name = spec.name(l)
            inst = c[2:]

            def patch(x, hook=None):
                x = x.clone()
                if cache is not None:
                    value = cache[name]
                elif reference == "zero":
                    value = torch.zeros_like(x)
                else:
                    value = mean[l](x, spans)
                for sel in _naive_selection(spec, inst, heads_list, spans):
                    x[sel] = value[sel].to(x.dtype)
                return x

            logits = final_logits(model.run_with_hooks(run_on, fwd_hooks=[(name, patch)]), one.last)
            raw[c] = compute_metric(metric, logits, one, clean_logits=clean_logits)[0].cpu()
            bar.update(1)
    bar.close()
    return _result(spec, [raw], [m_clean], [m_cf], axes, labels, model, dataset, metric, seed, {"naive": True})


def _naive_selection(spec: SweepSpec, inst: tuple, heads: list[int], spans: list[int]):
    """Index tuples (into a [1, ...] activation) of the entries one patch overwrites."""
    shape = spec.shape
    if shape in ("pos", "head_pos"):
        p = inst[-1]
        tokens = [t for t, s in enumerate(spans) if s == p] if spec.positions == "span" else [p]
    if shape == "pos":
        return [(0, t) for t in tokens]
    h = heads[inst[0]]
    if shape == "head_pos":
        return [(0, t, h) for t in tokens]
    if spec.component == "pattern":
        return [(0, h)]
    return [(0, slice(None), h)]


def _naive_means(model, spec: SweepSpec, ref: PromptPairDataset) -> dict:
    """layer -> fn(activation like, spans) giving the mean reference, accumulated one example at a time
    with run_with_cache (independent of `mean_activations`)."""
    device = model_device(model)
    sums: dict = {}
    counts: dict = {}
    for e, ex in enumerate(ref.examples):
        cache = model.run_with_cache(torch.tensor([ex.clean], device=device))[1]
        keys = ex.span_of_positions() if spec.positions == "span" else list(range(len(ex)))
        for l in spec.layers:
            a = cache[spec.name(l)][0]
            if spec.component == "pattern":
                sums[(l, 0)] = sums.get((l, 0), 0) + a
                counts[(l, 0)] = counts.get((l, 0), 0) + 1
                continue
            for t, k in enumerate(keys):
                sums[(l, k)] = sums.get((l, k), 0) + a[t]
                counts[(l, k)] = counts.get((l, k), 0) + 1

    def make(l):
        def value(x, spans):
            out = torch.zeros_like(x)
            if spec.component == "pattern":
                out[0] = sums[(l, 0)] / counts[(l, 0)]
                return out
            keys = spans if spec.positions == "span" else list(range(x.shape[1]))
            for t, k in enumerate(keys):
                out[0, t] = sums[(l, k)] / counts[(l, k)]
            return out

        return value

    return {l: make(l) for l in spec.layers}
