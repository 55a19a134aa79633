"""Induction heads (Olsson et al. 2022) in a two-layer attention-only transformer.

Training data: each sequence is BOS, a random prefix, then a random segment and its exact repeat,
filling `n_ctx` tokens. The segment length is drawn per sequence from [min_segment, max_segment], so
the distance back to the earlier copy changes from one sequence to the next and no fixed positional
offset predicts the repeat: the model has to match content. The tokens of one sequence's prefix and
segment are distinct, so each token of the repeat has exactly one earlier occurrence. The loss is
next-token cross-entropy on the predictable positions (inside the repeat; `loss_on="all"` adds every
position).

The mechanism it learns is a two-head circuit: a previous-token head in layer 0 writes "the token
before me was A" into the residual stream at B (the token after A); an induction head in layer 1,
at a later A, matches its query (the current token A) against those keys (K-composition), attends to
B and copies B into the logits.

The analysis measures, per head, on held-out repeated sequences:

* previous-token score: the mean attention from position i to i - 1;
* induction score: the mean attention, over the positions of the repeat, from a token to the token
  after its earlier occurrence;
* the in-context loss on the repeat against the loss on the first copy (unpredictable tokens);

and finds the circuit with PEAP on a prompt-pair task (`induction_task`): spans bos / prefix / A1 /
B1 / middle / D1 / C1 / tail / A2, every token distinct except that A1 and A2 are the same token, so
the answer at A2 is B1. The counterfactual swaps A1 and D1 (the token A now precedes C1, so its
answer is C1); the metric is the logit difference B1 - C1. The only difference between the two
prompts is which token precedes B1 and C1, so the change reaches the output through the previous-token
head's output at B1 (and C1) and the induction head's key there: the crossing key edge B1 -> A2.
"""

from __future__ import annotations

import base64
import html
import io
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from ..data.dataset import PromptPair, PromptPairDataset, Schema, tokenizer_fingerprint
from ..devices import HOST
from .registry import Toy
from .training import TrainState, ToyError, config_from_dict, read_checkpoint, save_checkpoint, train_loop
from .transformer import HookedToyTransformer, ToyConfig

NAME = "induction"
BOS = 0
SPANS = ("bos", "prefix", "A1", "B1", "middle", "D1", "C1", "tail", "A2")
TASK_SPAN_MAX = 6  # prefix, middle and tail of the task's prompts have 0..this many tokens


@dataclass
class InductionConfig:
    """A two-layer attention-only transformer trained on repeated random segments."""

    d_vocab: int = 64  # token 0 is BOS; the random tokens are 1 .. d_vocab - 1
    n_ctx: int = 40  # every training sequence fills the context
    d_model: int = 64
    n_heads: int = 2
    d_head: int = 32
    min_segment: int = 6
    max_segment: int = 16
    loss_on: str = "repeat"  # "repeat": the predictable positions of the repeat; "all": every position
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 64
    steps: int = 1500
    eval_every: int = 100
    n_eval: int = 256  # held-out repeated sequences for the scores
    n_pairs: int = 64  # prompt pairs of the induction task (PEAP, faithfulness)
    seed: int = 0

    def __post_init__(self):
        positive = ("d_vocab", "n_ctx", "d_model", "n_heads", "d_head", "batch_size", "eval_every", "n_eval", "n_pairs")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ToyError(f"InductionConfig.{name} must be a whole number of at least 1, got {value!r}")
        for name in ("steps", "seed", "min_segment", "max_segment"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ToyError(f"InductionConfig.{name} must be a whole number of at least 0, got {value!r}")
        if self.min_segment < 2:
            raise ToyError(f"InductionConfig.min_segment must be at least 2 (a repeat needs a token to predict), "
                           f"got {self.min_segment}")
        if self.max_segment < self.min_segment:
            raise ToyError(f"InductionConfig.max_segment ({self.max_segment}) is below min_segment ({self.min_segment})")
        if 2 * self.max_segment + 1 > self.n_ctx:
            raise ToyError(f"InductionConfig.max_segment={self.max_segment}: BOS and two copies need "
                           f"{2 * self.max_segment + 1} tokens, more than n_ctx={self.n_ctx}")
        if self.n_ctx - self.min_segment > self.d_vocab - 1:
            raise ToyError(f"InductionConfig.d_vocab={self.d_vocab}: a sequence with a {self.min_segment}-token segment "
                           f"needs {self.n_ctx - self.min_segment} distinct tokens besides BOS; raise d_vocab or "
                           f"min_segment, or lower n_ctx")
        if self.max_segment < self.min_segment + 2:
            raise ToyError(f"InductionConfig.max_segment={self.max_segment}: the induction task's two matches lie "
                           f"2 tokens apart, so max_segment must be at least min_segment + 2 = {self.min_segment + 2}")
        if self.loss_on not in ("repeat", "all"):
            raise ToyError(f"InductionConfig.loss_on must be 'repeat' or 'all', got {self.loss_on!r}")
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
                    or value < 0 or (name == "lr" and value == 0):
                raise ToyError(f"InductionConfig.{name} must be a finite number {'above' if name == 'lr' else 'of at least'} 0, "
                               f"got {value!r}")

    def model_config(self, device=None) -> ToyConfig:
        return ToyConfig(n_layers=2, n_heads=self.n_heads, d_model=self.d_model, d_head=self.d_head,
                         d_vocab=self.d_vocab, n_ctx=self.n_ctx, d_mlp=0, model_name="toy-induction",
                         attention_dir="causal", device=torch.device(device or "cpu"))


class InductionTokenizer:
    """Token names <-> ids of the toy's vocabulary: `<bos>` (id 0, also the padding) and t1 .. t{V-1}."""

    def __init__(self, d_vocab: int):
        self.names = ["<bos>"] + [f"t{i}" for i in range(1, d_vocab)]
        self.ids = {name: i for i, name in enumerate(self.names)}
        self.bos_token_id = self.pad_token_id = BOS

    def __len__(self) -> int:
        return len(self.names)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.ids)

    def encode(self, names) -> list[int]:
        try:
            return [BOS] + [self.ids[n] for n in names]
        except KeyError as exc:
            raise ValueError(f"token {exc.args[0]!r} is not in the toy's vocabulary (<bos>, t1 .. t{len(self) - 1})") from None

    def decode(self, ids) -> str:
        return " ".join(self.convert_ids_to_tokens(ids))

    def convert_ids_to_tokens(self, ids) -> list[str]:
        return [self.names[int(i)] for i in ids]


def make_model(config: InductionConfig, device=None) -> HookedToyTransformer:
    return HookedToyTransformer(config.model_config(device), tokenizer=InductionTokenizer(config.d_vocab))


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------


@dataclass
class RepeatBatch:
    """Repeated random sequences, on the host: tokens [b, n_ctx]; `start` [b] the first position of
    the repeat; `segment` [b] its length. Position j >= start holds a copy of position j - segment."""

    tokens: torch.Tensor
    start: torch.Tensor
    segment: torch.Tensor

    def repeat_mask(self) -> torch.Tensor:
        """[b, n_ctx - 1]: next-token predictions from inside the repeat (the predictable ones)."""
        pos = torch.arange(self.tokens.shape[1] - 1, device=HOST)[None]
        return pos >= self.start[:, None]

    def first_mask(self) -> torch.Tensor:
        """[b, n_ctx - 1]: predictions of the first copy's tokens (unpredictable: each is new)."""
        pos = torch.arange(self.tokens.shape[1] - 1, device=HOST)[None]
        return (pos + 1 >= self.start[:, None] - self.segment[:, None]) & (pos + 1 < self.start[:, None])


def repeated_batch(config: InductionConfig, n: int, seed: int) -> RepeatBatch:
    """`n` sequences BOS, prefix, segment, segment (distinct tokens in prefix + segment), seeded."""
    gen = torch.Generator(device=HOST).manual_seed(seed)
    t = config.n_ctx
    seg = torch.randint(config.min_segment, config.max_segment + 1, (n,), generator=gen, device=HOST)
    prefix = t - 1 - 2 * seg
    perm = torch.rand(n, config.d_vocab - 1, generator=gen, device=HOST).argsort(-1) + 1  # distinct tokens
    j = torch.arange(1, t, device=HOST)[None].expand(n, -1)  # positions after BOS
    k = j - 1 - prefix[:, None]  # offset into the first copy (negative: prefix)
    index = torch.where(k < 0, j - 1, prefix[:, None] + k % seg[:, None])
    body = perm.gather(1, index)
    tokens = torch.cat([torch.full((n, 1), BOS, dtype=torch.long, device=HOST), body], 1)
    return RepeatBatch(tokens, 1 + prefix + seg, seg)


def step_seed(config: InductionConfig, step: int) -> int:
    return (config.seed * 1_000_003 + step) % (2 ** 62)


def held_out_seed(config: InductionConfig) -> int:
    return (config.seed * 1_000_003 + 2 ** 40) % (2 ** 62)  # far from every training step's seed


def sequence_losses(model, batch: RepeatBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prediction cross-entropy [b, n_ctx - 1] and the logits' device."""
    device = model.W_E.device
    tokens = batch.tokens.to(device)
    logits = model(tokens)[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1),
                                             reduction="none")
    return loss.view(tokens.shape[0], -1), device


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.device).to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def patterns(model, tokens: torch.Tensor) -> torch.Tensor:
    """Attention patterns [layer, batch, head, query, key]."""
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)]
    _, cache = model.run_with_cache(tokens.to(model.W_E.device), names_filter=lambda n: n in names)
    return torch.stack([cache[n] for n in names])


def head_scores(pattern: torch.Tensor, batch: RepeatBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(previous-token score, induction score), each [layer, head], from patterns [layer, b, head, q, k]."""
    device = pattern.device
    t = pattern.shape[-1]
    prev = pattern.diagonal(offset=-1, dim1=-2, dim2=-1).mean((1, 3))  # attention i -> i - 1, i >= 1
    q = torch.arange(t, device=device)[None]  # [1, t]
    seg = batch.segment.to(device)[:, None]
    in_repeat = q >= batch.start.to(device)[:, None]  # [b, t]
    key = (q - seg + 1).clamp(0, t - 1)  # the token after the earlier occurrence
    index = key[None, :, None, :, None].expand(pattern.shape[0], -1, pattern.shape[2], -1, 1)
    to_key = pattern.gather(-1, index).squeeze(-1)  # [layer, b, head, t]
    weight = in_repeat[None, :, None, :].to(pattern.dtype)
    induction = (to_key * weight).sum((1, 3)) / weight.sum((1, 3))
    return prev, induction


def identify_heads(prev: torch.Tensor, induction: torch.Tensor) -> tuple[tuple[int, int], tuple[int, int]]:
    """((layer, head) of the best previous-token head, (layer, head) of the best induction head), each
    the argmax over every head of the model: the mechanism puts the first in layer 0, the second in 1."""
    p, i = int(prev.flatten().argmax()), int(induction.flatten().argmax())
    n = prev.shape[1]
    return (p // n, p % n), (i // n, i % n)


@torch.no_grad()
def evaluate_batch(model, batch: RepeatBatch) -> dict:
    losses, _ = sequence_losses(model, batch)
    prev, ind = head_scores(patterns(model, batch.tokens), batch)
    return {"loss_repeat": float(masked_mean(losses, batch.repeat_mask())),
            "loss_first": float(masked_mean(losses, batch.first_mask())),
            "prev_token_score": float(prev[0].max()), "induction_score": float(ind[1].max())}


# ---------------------------------------------------------------------------------------------------
# Training, saving, loading
# ---------------------------------------------------------------------------------------------------


@dataclass
class TrainedInduction:
    config: InductionConfig
    model: HookedToyTransformer
    state: TrainState
    seconds: float = 0.0

    @property
    def summary(self) -> dict:
        last = self.state.history[-1] if self.state.history else {}
        return {"steps": self.state.step, **{k: v for k, v in last.items() if k != "step"},
                **({"train_seconds": round(self.seconds, 2)} if self.seconds else {})}


def train(config: InductionConfig, out=None, device=None, progress: bool = True, resume: bool = False) -> TrainedInduction:
    """Train with AdamW on fresh repeated sequences every step (seeded by the step, so a resumed run
    sees the same data), evaluating on held-out sequences every `eval_every` steps."""
    device = torch.device(device or "cpu")
    model = make_model(config, device).init_weights(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    state = TrainState()
    if resume:
        if out is None:
            raise ToyError("resume needs the checkpoint directory")
        ckpt = read_checkpoint(out, device, expect=NAME)
        saved = config_from_dict(InductionConfig, ckpt.config, where=f"{Path(out) / 'toy.json'}")
        if {**asdict(saved), "steps": 0} != {**asdict(config), "steps": 0}:
            raise ToyError(f"{out}: the checkpoint was trained with another config; resume with its own settings")
        model.load_state_dict(ckpt.tensors)
        if ckpt.optimizer is not None:
            optimizer.load_state_dict(ckpt.optimizer)
        state = ckpt.state
    held_out = repeated_batch(config, config.n_eval, held_out_seed(config))

    def loss_fn(step: int) -> torch.Tensor:
        batch = repeated_batch(config, config.batch_size, step_seed(config, step))
        losses, _ = sequence_losses(model, batch)
        if config.loss_on == "all":
            return losses.mean()
        return masked_mean(losses, batch.repeat_mask())

    save = None
    if out is not None:
        save = lambda st: save_checkpoint(out, NAME, config, model, optimizer, st)  # noqa: E731
    start = time.perf_counter()
    state = train_loop(model, optimizer, loss_fn, steps=config.steps, state=state,
                       eval_fn=lambda step: evaluate_batch(model, held_out), eval_every=config.eval_every,
                       save=save, checkpoint_every=max(config.eval_every, 500), progress=progress, desc="induction")
    if out is not None and state.step == 0:
        save_checkpoint(out, NAME, config, model, optimizer, state)
    return TrainedInduction(config, model, state, time.perf_counter() - start)


def load(path, device=None) -> TrainedInduction:
    ckpt = read_checkpoint(path, device, expect=NAME)
    config = config_from_dict(InductionConfig, ckpt.config, where=f"{Path(path) / 'toy.json'}")
    model = make_model(config, device or "cpu")
    try:
        model.load_state_dict(ckpt.tensors)
    except RuntimeError as exc:
        raise ToyError(f"{path}: model.safetensors does not fit its config ({str(exc).splitlines()[0]})") from None
    model.eval()
    return TrainedInduction(config, model, ckpt.state)


# ---------------------------------------------------------------------------------------------------
# The prompt-pair task
# ---------------------------------------------------------------------------------------------------


def induction_task(config: InductionConfig, n: int | None = None, seed: int | None = None) -> PromptPairDataset:
    """`n` prompt pairs over the spans SPANS (see the module docstring): clean answer B1, counterfactual
    (A1 and D1 swapped) answer C1, metric logit_diff B1 - C1."""
    n = config.n_pairs if n is None else n
    seed = (config.seed + 7919) if seed is None else seed
    rng = random.Random(f"induction-task-{seed}")
    tok = InductionTokenizer(config.d_vocab)
    examples = []
    for _ in range(n):
        # Both matches (A1 in the clean prompt, D1 in the counterfactual) lie as far before A2 as the
        # training repeats did (min_segment .. max_segment), and a random prefix fills the context as
        # in training, so A2 sits where training's repeats were predicted.
        while True:
            m, r = rng.randint(0, TASK_SPAN_MAX), rng.randint(0, 2 * TASK_SPAN_MAX)
            if r + 2 >= config.min_segment and m + r + 4 <= config.max_segment:
                break
        p = min(config.n_ctx - 6 - m - r, config.d_vocab - 5 - m - r)
        ids = rng.sample(range(1, config.d_vocab), p + m + r + 4)
        prefix, (a, b, d, c), middle, tail = ids[:p], ids[p:p + 4], ids[p + 4:p + 4 + m], ids[p + 4 + m:]
        clean = [BOS, *prefix, a, b, *middle, d, c, *tail, a]
        cf = [BOS, *prefix, d, b, *middle, a, c, *tail, a]
        lengths = [1, p, 1, 1, m, 1, 1, r, 1]
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        examples.append(PromptPair(clean=clean, counterfactual=cf, correct=[b], wrong=[c], span_starts=starts,
                                   clean_text=tok.decode(clean), counterfactual_text=tok.decode(cf),
                                   meta={"A": a, "B": b, "C": c, "D": d}))
    return PromptPairDataset(examples=examples, schema=Schema(SPANS), task="toy-induction", metric="logit_diff",
                             model="toy-induction", tokenizer=tokenizer_fingerprint(tok), pad_token_id=BOS,
                             info={"counterfactual": "A1 and D1 swapped: the answer moves from B1 to C1"})


def key_edges(circuit, graph, prev_head: int, ind_head: int) -> dict[str, bool]:
    """Whether a span circuit holds the K-composition edges: the previous-token head's output at B1
    into the induction head's key input at B1 (within), and the induction head's key at B1 into its
    output at A2 (crossing)."""
    b1, a2 = SPANS.index("B1"), SPANS.index("A2")
    up = graph.head_index(0, prev_head)
    down = graph.k_slice(1).start + ind_head // graph.group_size
    edge = ((graph.edge_up == up) & (graph.edge_down == down)).nonzero().flatten()
    within = bool(circuit.within[b1, int(edge[0])]) if edge.numel() else False
    crossing = bool(circuit.crossing["k"][1, ind_head, b1, a2])
    return {"prev_to_key_at_B1": within, "key_B1_to_A2": crossing}


def circuit_check(model, prev_head: int, ind_head: int, data: PromptPairDataset, progress: bool = False,
                  target: float = 0.8) -> dict:
    """PEAP on `data`, a greedy faithfulness curve, and whether its smallest circuit with normalised
    faithfulness >= `target` holds the K-composition edges (`key_edges`)."""
    from ..attribution import attribute
    from ..circuits.evaluation import faithfulness_curve

    scores = attribute(model, data, "peap", progress=progress)
    curve = faithfulness_curve(model, scores, data, selection="greedy", progress=progress)
    points = [{"n_edges": p.n_edges, "concrete_edges": p.concrete_edges, "normalized": p.normalized}
              for p in curve.points]
    out = {"metric_model": curve.points[-1].metric_model if curve.points else None, "curve": points,
           "smallest": None, "edges": {"prev_to_key_at_B1": False, "key_B1_to_A2": False}}
    for i, p in enumerate(curve.points):
        if p.normalized >= target:
            circuit = curve.circuits[i]
            out["smallest"] = {"n_edges": circuit.n_edges, "normalized": p.normalized,
                               "edges_listed": circuit.to_json().get("crossing", [])[:20]}
            out["edges"] = key_edges(circuit, scores.graph, prev_head, ind_head)
            break
    out["holds"] = all(out["edges"].values())
    top = scores.crossing["k"][1].abs()
    flat = int(top.argmax())
    h, ks, qs = (flat // (top.shape[1] * top.shape[2]), (flat // top.shape[2]) % top.shape[1], flat % top.shape[2])
    out["top_layer1_key_edge"] = f"{SPANS[ks]}:a1.h{h}.k -> {SPANS[qs]}:a1.h{h}"
    return out


# ---------------------------------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------------------------------


@dataclass
class InductionAnalysis:
    summary: dict
    prev_scores: list  # [layer][head]
    induction_scores: list
    example: list[str]  # token names of the example sequence
    prev_pattern: list  # [query][key] of the previous-token head on the example
    ind_pattern: list
    example_start: int
    example_segment: int
    extra: dict = field(default_factory=dict)

    def figure(self, path) -> None:
        _figure(self, path)

    def png(self) -> bytes:
        buf = io.BytesIO()
        _figure(self, buf)
        return buf.getvalue()

    def files(self) -> dict:
        return {"toy-induction.png": self.figure}

    def sections(self):
        from ..report.page import Section
        from ..report.sections.summary import fmt, table

        s = self.summary
        img = base64.b64encode(self.png()).decode("ascii")
        rows = [(k, fmt(s[k])) for k in ("steps", "prev_token_head", "prev_token_score", "induction_head",
                                         "induction_score", "loss_first_half", "loss_repeated_half",
                                         "peap_smallest_circuit_edges", "peap_smallest_circuit_normalized",
                                         "peap_key_edge_in_circuit") if k in s]
        heads = "".join(
            f"<tr><td>a{l}.h{h}</td><td class='num'>{self.prev_scores[l][h]:.3f}</td>"
            f"<td class='num'>{self.induction_scores[l][h]:.3f}</td></tr>"
            for l in range(len(self.prev_scores)) for h in range(len(self.prev_scores[l])))
        body = (f"<p class='note'>Two-layer attention-only transformer trained on repeated random segments. "
                f"Previous-token score: mean attention from i to i-1; induction score: mean attention, in the "
                f"repeat, to the token after the earlier occurrence (held-out sequences). The PEAP check: the "
                f"smallest greedy span circuit with normalised faithfulness &ge; 0.8 on the A1/D1-swap task holds "
                f"the previous-token head's edge into the induction head's key at B1 and the crossing key edge "
                f"B1 &rarr; A2.</p>{table(rows)}"
                f"<table><tr><th>head</th><th>previous-token score</th><th>induction score</th></tr>{heads}</table>"
                f"<img alt='induction heads' style='max-width:100%' src='data:image/png;base64,{img}'>")
        return [Section(id="toy-induction", title="Induction heads", html=body)]


def analyze(trained: TrainedInduction, progress: bool = True, circuit: bool = True) -> InductionAnalysis:
    config, model = trained.config, trained.model
    model.eval()
    batch = repeated_batch(config, config.n_eval, held_out_seed(config))
    pattern = patterns(model, batch.tokens)
    prev, ind = head_scores(pattern, batch)
    (lp, hp), (li, hi) = identify_heads(prev, ind)
    found = lp == 0 and li == 1
    with torch.no_grad():
        losses, _ = sequence_losses(model, batch)
    summary = {
        "steps": trained.state.step,
        "prev_token_head": f"a{lp}.h{hp}", "prev_token_score": float(prev[lp, hp]),
        "induction_head": f"a{li}.h{hi}", "induction_score": float(ind[li, hi]),
        "heads_in_expected_layers": found,
        "prev_token_score_in_layer1_best": float(prev[1].max()),
        "induction_score_in_layer0_best": float(ind[0].max()),
        "loss_first_half": float(masked_mean(losses, batch.first_mask())),
        "loss_repeated_half": float(masked_mean(losses, batch.repeat_mask())),
        "loss_chance": math.log(config.d_vocab - 1),
        "prev_token_scores": prev.tolist(), "induction_scores": ind.tolist(),
    }
    extra = {}
    if circuit and found:
        check = circuit_check(model, hp, hi, induction_task(config), progress=progress)
        extra = check
        summary.update({
            "peap_smallest_circuit_edges": (check["smallest"] or {}).get("n_edges"),
            "peap_smallest_circuit_normalized": (check["smallest"] or {}).get("normalized"),
            "peap_key_edge_in_circuit": check["holds"],
            "peap_prev_to_key_at_B1": check["edges"]["prev_to_key_at_B1"],
            "peap_key_B1_to_A2": check["edges"]["key_B1_to_A2"],
            "peap_top_layer1_key_edge": check["top_layer1_key_edge"],
            "peap_curve": check["curve"],
        })
    elif circuit:  # no previous-token head in layer 0 feeding an induction head in layer 1 to look for
        summary.update({"peap_key_edge_in_circuit": False, "peap_prev_to_key_at_B1": False, "peap_key_B1_to_A2": False})
    i = 0
    return InductionAnalysis(summary, prev.tolist(), ind.tolist(), InductionTokenizer(config.d_vocab).convert_ids_to_tokens(batch.tokens[i]),
                             pattern[lp, i, hp].cpu().tolist(), pattern[li, i, hi].cpu().tolist(),
                             int(batch.start[i]), int(batch.segment[i]), extra)


def _figure(a: InductionAnalysis, target) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = a.summary
    prev, ind = torch.tensor(a.prev_scores), torch.tensor(a.induction_scores)
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.9), constrained_layout=True,
                             gridspec_kw={"width_ratios": [1, 1, 2.2, 2.2]})
    for ax, values, title in ((axes[0], prev, "previous-token score"), (axes[1], ind, "induction score")):
        im = ax.imshow(values.numpy(), vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(values.shape[1]))
        ax.set_yticks(range(values.shape[0]))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(title, fontsize=10)
        for (l, h), v in zip(((l, h) for l in range(values.shape[0]) for h in range(values.shape[1])), values.flatten()):
            ax.text(h, l, f"{float(v):.2f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=9)
    fig.colorbar(im, ax=axes[:2], shrink=0.8)
    for ax, pat, title in ((axes[2], a.prev_pattern, f"{s['prev_token_head']} (previous-token head)"),
                           (axes[3], a.ind_pattern, f"{s['induction_head']} (induction head)")):
        ax.imshow(torch.tensor(pat).numpy(), cmap="Blues", vmin=0, vmax=1)
        ax.axvline(a.example_start - a.example_segment - 0.5, color="#c33", lw=0.8, ls=":")
        ax.axhline(a.example_start - 0.5, color="#c33", lw=0.8, ls=":")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
    fig.suptitle(f"Induction heads, 2-layer attention-only: induction score {s['induction_score']:.3f}, "
                 f"loss first copy {s['loss_first_half']:.2f} vs repeat {s['loss_repeated_half']:.3f} nats "
                 f"(dotted: the repeat starts; segment {a.example_segment})", fontsize=10)
    fig.savefig(target, dpi=110, format="png")
    plt.close(fig)


TOY = Toy(name=NAME, description="induction heads (Olsson et al. 2022): a previous-token head and an induction head "
                                 "in a two-layer attention-only transformer trained on repeated random segments",
          config=InductionConfig, train=train, load=load, analyze=analyze)

__all__ = ["InductionConfig", "InductionTokenizer", "InductionAnalysis", "TrainedInduction", "TOY", "analyze",
           "circuit_check", "head_scores", "induction_task", "key_edges", "load", "repeated_batch", "train"]
