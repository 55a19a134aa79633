"""Max-of-K with compact proofs (Gross et al. 2024, "Compact Proofs of Model Performance via
Mechanistic Interpretability").

A one-layer, one-head, attention-only transformer without LayerNorm reads K tokens drawn from
`d_vocab` and, at the last position, predicts the largest of them. Its accuracy over the whole input
space (d_vocab^K inputs: 64^4 = 16.7M by default) is proved in three ways:

* `brute_force`: run the model on every input. The bound is the accuracy itself; the cost is
  d_vocab^K forward passes.
* `cubic` and `per_output`: proofs that use the mechanism. With one layer and no LayerNorm the
  logits at the last position are exactly

      logits = D[q] + sum_i a_i V[i, t_i],   a = softmax_i S[q, i, t_i]

  where q is the query (last) token, D the direct path (embedding, position, biases, unembedding),
  V[i, t] the value path of token t at position i (EVOU plus its position term) and S[q, i, t] the
  attention score (EQKE plus the position terms). The head attends to the largest token and copies it.
  For each class of inputs (m = the maximum, q = the query token, c = the largest token below m, or
  none) the proof bounds (1) the attention alpha paid to the tokens below m from above, by the best
  score any of them can get and the worst score a copy of m can get, and (2) each wrong logit minus
  the right one, which is affine in alpha between the worst value on the copies of m and the worst on
  the tokens up to c. The inputs of every class whose worst case still puts the right logit on top
  are certified correct; their exact number comes from a closed-form count. `per_output` keeps each
  output token apart (d_vocab^4 work); `cubic` takes the worst direct-path term and the worst
  value-path term separately (d_vocab^3 work), which is looser.
* `positional`: finer classes with an exact worst case. A class fixes m, q, c (here the largest
  earlier token below m) and which earlier positions hold m, which c and which a token below c, so it
  is a product of per-position token sets. Since the softmax denominator is positive, a wrong logit
  minus the right one has the sign of sum_i exp(S[q, i, t_i]) (V[i, t_i, o] - V[i, t_i, m] + D[q, o]
  - D[q, m]), a sum of one term per position: its largest value over the class is the sum of each
  position's largest term (a prefix maximum over the tokens below c). A class is certified exactly
  when all its inputs are right (beyond the slack); about d_vocab^4 3^(K-1) work.

Soundness: the tables are computed in float64 from the float32 weights, and a class counts only if
its worst-case margin exceeds `slack` (1e-4 of the largest |logit term|), a generous allowance for the
rounding in the model's own float32 forward pass (the brute force is the float32 model). An input
counts as correct when its logit for the maximum is strictly above every other logit.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..devices import HOST, model_device, resolve_device, synchronize
from .registry import Toy
from .training import ToyError, TrainState, config_from_dict, read_checkpoint, save_checkpoint, train_loop
from .transformer import HookedToyTransformer, ToyConfig

NAME = "max-of-k"


@dataclass
class MaxOfKConfig:
    """The paper's setup: 64 tokens, K = 4, one layer, one head, attention-only, d_model = d_head = 32,
    no LayerNorm; AdamW (lr 1e-3, weight decay 1.0), batch 128, 3000 steps (384k sequences)."""

    d_vocab: int = 64
    k: int = 4  # tokens per input (the model reads them all and answers at the last)
    n_ctx: int = 4  # the model's context (at least k)
    d_model: int = 32
    d_head: int = 32
    lr: float = 1e-3
    weight_decay: float = 1.0
    batch: int = 128
    steps: int = 3000
    seed: int = 0
    eval_every: int = 250
    eval_size: int = 4096

    def __post_init__(self):
        for name in ("k", "n_ctx", "d_model", "d_head", "batch", "eval_every", "eval_size"):
            if int(getattr(self, name)) < 1:
                raise ToyError(f"MaxOfKConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.d_vocab < 2:
            raise ToyError(f"MaxOfKConfig.d_vocab must be at least 2 (a maximum of one token is trivial), got {self.d_vocab}")
        if self.k > self.n_ctx:
            raise ToyError(f"MaxOfKConfig.k = {self.k} is larger than the context n_ctx = {self.n_ctx}")
        if self.steps < 0:
            raise ToyError(f"MaxOfKConfig.steps must be 0 or more, got {self.steps}")
        if not self.lr > 0:
            raise ToyError(f"MaxOfKConfig.lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ToyError(f"MaxOfKConfig.weight_decay must be 0 or more, got {self.weight_decay}")

    def model_config(self, device=None) -> ToyConfig:
        return ToyConfig(n_layers=1, n_heads=1, d_model=self.d_model, d_head=self.d_head, d_vocab=self.d_vocab,
                         n_ctx=self.n_ctx, d_mlp=0, model_name=NAME, attention_dir="causal",
                         device=torch.device(device or HOST))


@dataclass
class MaxOfK:
    """A trained (or loaded) max-of-K model."""

    config: MaxOfKConfig
    model: HookedToyTransformer
    state: TrainState = field(default_factory=TrainState)

    @property
    def summary(self) -> dict:
        return {"step": self.state.step, "loss": self.state.last("loss"), "sample_accuracy": self.state.last("accuracy")}


def sample(config: MaxOfKConfig, n: int, seed: int, device) -> torch.Tensor:
    """`n` uniformly random inputs [n, k], drawn on the host with `seed` (the same on every device)."""
    gen = torch.Generator(device=HOST).manual_seed(seed)
    return torch.randint(0, config.d_vocab, (n, config.k), generator=gen, device=HOST).to(device)


def build_model(config: MaxOfKConfig, device=None) -> HookedToyTransformer:
    return HookedToyTransformer(config.model_config(device)).init_weights(seed=config.seed)


def _optimizer(config: MaxOfKConfig, model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def train(config: MaxOfKConfig, out=None, device=None, progress: bool = True, resume: bool = False) -> MaxOfK:
    """Train on fresh uniformly random inputs each step (step s's batch is drawn with seed
    (seed, s), so a resumed run sees the same data), checkpointing into `out`."""
    device = resolve_device(device)
    model = build_model(config, device)
    optimizer = _optimizer(config, model)
    state = TrainState()
    if resume:
        if out is None:
            raise ToyError("resume needs the checkpoint directory (out)")
        ckpt = read_checkpoint(out, device=device, expect=NAME)
        saved = config_from_dict(MaxOfKConfig, ckpt.config, where=str(Path(out) / "toy.json"))
        if {**vars(saved), "steps": 0} != {**vars(config), "steps": 0}:
            raise ToyError(f"{out}: the checkpoint was trained with another config; resume with the same --set values")
        model.load_state_dict(ckpt.tensors)
        if ckpt.optimizer is not None:
            optimizer.load_state_dict(ckpt.optimizer)
        state = ckpt.state
    held_out = sample(config, config.eval_size, seed=config.seed + 7919, device=device)

    def loss_fn(step: int) -> torch.Tensor:
        tokens = sample(config, config.batch, seed=config.seed * 1_000_003 + step + 1, device=device)
        logits = model(tokens)[:, config.k - 1]
        return nn.functional.cross_entropy(logits, tokens.max(-1).values)

    def eval_fn(step: int) -> dict:
        logits = model(held_out)[:, config.k - 1]
        return {"accuracy": float((logits.argmax(-1) == held_out.max(-1).values).float().mean())}

    save = None
    if out is not None:
        save = lambda st: save_checkpoint(out, NAME, config, model, optimizer, st)  # noqa: E731
    state = train_loop(model, optimizer, loss_fn, steps=config.steps, state=state, eval_fn=eval_fn,
                       eval_every=config.eval_every, save=save, checkpoint_every=config.eval_every * 4,
                       progress=progress, desc=NAME)
    if out is not None and config.steps == 0:
        save_checkpoint(out, NAME, config, model, optimizer, state)
    return MaxOfK(config, model, state)


def load(path, device=None) -> MaxOfK:
    device = resolve_device(device)
    ckpt = read_checkpoint(path, device=device, expect=NAME)
    config = config_from_dict(MaxOfKConfig, ckpt.config, where=str(Path(path) / "toy.json"))
    model = HookedToyTransformer(config.model_config(device))
    model.load_state_dict(ckpt.tensors)
    model.eval()
    return MaxOfK(config, model, ckpt.state)


# Proofs -------------------------------------------------------------------------------------------


@dataclass
class Proof:
    """A lower bound on accuracy over all d_vocab^K inputs, what it cost and how long it took."""

    strategy: str
    bound: float  # certified correct / all inputs
    certified: int
    total: int
    flops: int
    seconds: float
    detail: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"strategy": self.strategy, "bound": self.bound, "certified": self.certified, "total": self.total,
                "flops": self.flops, "seconds": self.seconds, **self.detail}


def _check(model: HookedToyTransformer, k: int) -> None:
    cfg = model.cfg
    if cfg.n_layers != 1 or cfg.n_heads != 1 or cfg.d_mlp != 0 or cfg.attention_dir != "causal":
        raise ToyError("the max-of-K proofs need a one-layer, one-head, attention-only causal model")
    if not 1 <= k <= cfg.n_ctx:
        raise ToyError(f"k = {k} must be between 1 and the model's context {cfg.n_ctx}")


def forward_flops(cfg: ToyConfig, k: int) -> int:
    """Floating-point operations of one forward pass of the attention-only one-layer model on k tokens
    (a multiply-add counts 2; the causal score matrix is counted whole), plus the final comparison."""
    d, e, v = cfg.d_model, cfg.d_head, cfg.d_vocab_out
    embed = k * d
    qkv = 3 * k * (2 * d * e + e)
    scores = k * k * (2 * e + 1)
    softmax = 3 * k * k
    mix = k * k * 2 * e
    out = k * (2 * e * d + d) + k * d
    unembed = k * (2 * d * v + v)
    return embed + qkv + scores + softmax + mix + out + unembed + v


def _inputs(start: int, stop: int, d_vocab: int, k: int, device) -> torch.Tensor:
    """Inputs number start..stop-1 in base d_vocab (position 0 the most significant digit)."""
    idx = torch.arange(start, stop, device=device, dtype=torch.int64)
    powers = d_vocab ** torch.arange(k - 1, -1, -1, device=device, dtype=torch.int64)
    return (idx[:, None] // powers) % d_vocab


def margins_of(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The right logit minus the best wrong one, per row."""
    right = logits.gather(-1, target[:, None])[:, 0]
    wrong = logits.scatter(-1, target[:, None], float("-inf")).max(-1).values
    return right - wrong


@torch.no_grad()
def brute_force(model: HookedToyTransformer, k: int, batch: int = 1 << 15, keep_margins: bool = False,
                progress: bool = False) -> Proof:
    """Run every input through the model (in batches, on its device): the bound is the accuracy.
    With `keep_margins`, detail['margins'] holds each input's margin (input order as `_inputs`)."""
    _check(model, k)
    from tqdm.auto import tqdm

    device = model_device(model)
    d = model.cfg.d_vocab
    total = d ** k
    certified = 0
    argmax_right = 0
    kept = []
    synchronize(device)
    start_time = time.perf_counter()
    for start in tqdm(range(0, total, batch), desc="brute force", disable=not progress):
        tokens = _inputs(start, min(start + batch, total), d, k, device)
        logits = model(tokens)[:, k - 1]
        target = tokens.max(-1).values
        margin = margins_of(logits, target)
        certified += int((margin > 0).sum())
        argmax_right += int((logits.argmax(-1) == target).sum())
        if keep_margins:
            kept.append(margin.to(HOST))
    synchronize(device)
    seconds = time.perf_counter() - start_time
    detail = {"argmax_accuracy": argmax_right / total}
    if keep_margins:
        detail["margins"] = torch.cat(kept)
    return Proof("brute_force", certified / total, certified, total, forward_flops(model.cfg, k) * total, seconds, detail)


@dataclass
class Paths:
    """The model's last-position logits decomposed exactly (float64, on the model's device):
    logits = D[q] + sum_i a_i V[i, t_i], with a = softmax_i S[q, i, t_i] over the k positions."""

    D: torch.Tensor  # [d_vocab (query), d_vocab_out]
    V: torch.Tensor  # [k, d_vocab, d_vocab_out]
    S: torch.Tensor  # [d_vocab (query), k, d_vocab (key)]
    flops: int


def path_tables(model: HookedToyTransformer, k: int) -> Paths:
    _check(model, k)
    cfg = model.cfg
    f64 = torch.float64
    attn = model.blocks[0].attn
    W_E, W_pos, W_U, b_U = (p.detach().to(f64) for p in (model.W_E, model.W_pos[:k], model.W_U, model.b_U))
    W_Q, W_K, W_V, W_O = (p.detach()[0].to(f64) for p in (attn.W_Q, attn.W_K, attn.W_V, attn.W_O))
    b_Q, b_K, b_V, b_O = (p.detach()[0].to(f64) if p.dim() == 2 else p.detach().to(f64)
                          for p in (attn.b_Q, attn.b_K, attn.b_V, attn.b_O))
    n, d, e, v = cfg.d_vocab, cfg.d_model, cfg.d_head, cfg.d_vocab_out
    scale = cfg.attn_scale if cfg.attn_scale > 0 else math.sqrt(e)
    resid = W_E[None] + W_pos[:, None]  # [k, n, d]
    query = resid[k - 1] @ W_Q + b_Q  # [n, e]
    keys = resid @ W_K + b_K  # [k, n, e]
    S = torch.einsum("qe,pte->qpt", query, keys) / scale
    V = ((resid @ W_V + b_V) @ W_O) @ W_U  # [k, n, v]
    D = (resid[k - 1] + b_O) @ W_U + b_U  # [n, v]
    flops = (k * n * d + n * (2 * d * e + e) + k * n * (2 * d * e + e) + n * k * n * (2 * e + 1)
             + k * n * (2 * d * e + e + 2 * e * d + 2 * d * v) + n * (d + 2 * d * v + v))
    return Paths(D, V, S, flops)


def class_counts(d_vocab: int, k: int, device=HOST) -> torch.Tensor:
    """[m, q, c + 1] int64: how many inputs have maximum m, last (query) token q and largest token
    below m equal to c (c = -1: every token is m). Sums to d_vocab^k."""
    n = d_vocab
    c = torch.arange(-1, n, device=device, dtype=torch.int64)  # index j holds c = j - 1
    m = torch.arange(n, device=device, dtype=torch.int64)[:, None, None]
    q = torch.arange(n, device=device, dtype=torch.int64)[None, :, None]
    cc = c[None, None, :]

    def prefixes(cv):  # the K-1 earlier tokens from {0..cv} and m; for q < m at least one of them is m
        with_m = (cv + 2).clamp(min=0) ** (k - 1)
        without = (cv + 1).clamp(min=0) ** (k - 1)
        return torch.where(q == m, with_m, torch.where(cv >= q, with_m - without, torch.zeros_like(with_m)))

    valid = (cc < m) & ((q == m) | (cc >= q))
    counts = (prefixes(cc) - torch.where(cc - 1 >= -1, prefixes(cc - 1), torch.zeros_like(cc))) * valid
    counts = torch.where(q > m, torch.zeros_like(counts), counts)
    return counts


def _slack(paths: Paths) -> float:
    return 1e-4 * float(paths.D.abs().max() + paths.V.abs().max())


@torch.no_grad()
def mechanism_proof(model: HookedToyTransformer, k: int, per_output: bool = False) -> Proof:
    """The proof that uses the mechanism (see the module docstring); `per_output` keeps each output
    token apart (tighter, d_vocab^4 work) rather than taking the worst terms apart (d_vocab^3)."""
    device = model_device(model)
    synchronize(device)
    start_time = time.perf_counter()
    paths = path_tables(model, k)
    D, V, S = paths.D, paths.V, paths.S
    n = model.cfg.d_vocab
    flops = paths.flops
    slack = _slack(paths)
    f64 = torch.float64
    eye = torch.eye(n, dtype=torch.bool, device=device)
    neg = torch.tensor(float("-inf"), dtype=f64, device=device)
    # VD[m, p, t, o] = V[p, t, o] - V[p, t, m]: how much token t at position p favours o over m.
    VD = V[None] - V.permute(2, 0, 1)[:, :, :, None]  # [m, p, t, o]
    flops += n * k * n * n
    A_all = VD.diagonal(dim1=0, dim2=2).permute(2, 0, 1).amax(1)  # [m, o]: a copy of m anywhere
    A_pre = VD[:, : k - 1].diagonal(dim1=0, dim2=2).permute(2, 0, 1).amax(1) if k >= 2 else None  # before the query
    B = VD.amax(1).cummax(1).values  # [m, c, o]: worst over positions and tokens t <= c
    flops += 2 * n * k * n + n * n * n * (k + 1)
    DD = D[:, None, :] - D[:, :n, None]  # [q, m, o] = D[q, o] - D[q, m]
    flops += n * n * n
    # Attention: worst (highest) score of a token <= c at an earlier position, worst (lowest) of m.
    s_low = S[:, : k - 1].amax(1).cummax(1).values if k >= 2 else None  # [q, c]
    s_max_pre = S[:, : k - 1].amin(1) if k >= 2 else None  # [q, m]: a copy of m before the query
    s_last = S[:, k - 1].diagonal()  # [q]: the query token at its own position
    flops += 3 * n * k * n
    counts = class_counts(n, k, device)  # [m, q, c + 1]
    proved = torch.zeros(n, n, n + 1, dtype=torch.bool, device=device)  # the classes certified
    for m in range(n):
        wrong = ~eye[m]  # outputs other than m
        for query_is_max in (True, False) if k >= 2 else (True,):
            qs = torch.tensor([m], device=device) if query_is_max else torch.arange(m, device=device)
            if qs.numel() == 0:
                continue
            A = A_all[m] if query_is_max else A_pre[m]  # [o]
            X = torch.where(wrong, DD[qs, m] + A, neg)  # [nq, o]: every attention on copies of m
            # alpha_max[q, c]: attention on tokens below m when they are all <= c, worst case.
            if k == 1 or m == 0:
                alpha = torch.zeros(qs.numel(), 0, dtype=f64, device=device)
            elif query_is_max:
                logit = math.log(k - 1) + s_low[m, :m] - S[m, k - 1, m]
                alpha = torch.sigmoid(logit)[None]  # [1, c]
            else:
                earlier = s_low[qs, :m]  # [nq, c]
                low = s_last[qs, None].expand_as(earlier)
                if k > 2:
                    low = torch.logaddexp(low, math.log(k - 2) + earlier)
                alpha = torch.sigmoid(low - s_max_pre[qs, m][:, None])
            nc = alpha.shape[1]
            flops += 6 * qs.numel() * nc
            if nc:
                if per_output and not query_is_max:
                    # The query's own value is known exactly. With x, y the attention on the query and on
                    # the earlier tokens below m relative to that on the copies of m (x <= rx, y <= ry),
                    # the wrong-minus-right logit is D + (A + x Vq + y B) / (1 + x + y), largest at a
                    # corner of the box [0, rx] x [0, ry].
                    rx = torch.exp(s_last[qs] - s_max_pre[qs, m])[:, None, None]  # [nq, 1, 1]
                    ry = ((k - 2) * torch.exp(s_low[qs, :m] - s_max_pre[qs, m][:, None]))[..., None]  # [nq, c, 1]
                    Aq = A[None, None, :]
                    Vq = (V[k - 1, qs] - V[k - 1, qs, m][:, None])[:, None, :]  # [nq, 1, o]
                    Bc = B[m, :nc][None]  # [1, c, o]
                    corners = [Aq, (Aq + rx * Vq) / (1 + rx), (Aq + ry * Bc) / (1 + ry),
                               (Aq + rx * Vq + ry * Bc) / (1 + rx + ry)]
                    Y = torch.stack(torch.broadcast_tensors(*corners)).amax(0) + DD[qs, m][:, None, :]
                    worst = torch.where(wrong, Y, neg).amax(-1)
                    flops += 16 * qs.numel() * nc * n
                elif per_output:
                    Y = torch.where(wrong, DD[qs, m][:, None, :] + B[m, :nc][None], neg)  # [nq, c, o]
                    worst_o = torch.maximum(X[:, None, :], (1 - alpha[..., None]) * X[:, None, :] + alpha[..., None] * Y)
                    worst = worst_o.amax(-1)
                    flops += 6 * qs.numel() * nc * n
                else:
                    x = X.amax(-1)[:, None]  # [nq, 1]
                    y = torch.where(wrong, DD[qs, m], neg).amax(-1)[:, None] + torch.where(wrong, B[m, :nc], neg).amax(-1)[None]
                    worst = torch.maximum(x, (1 - alpha) * x + alpha * y)
                    flops += 2 * qs.numel() * n + nc * n + 5 * qs.numel() * nc
                # (c < q is impossible when q < m, the query being below m: those classes count 0.)
                proved[m, qs, 1: nc + 1] = worst < -slack
            if query_is_max:  # every token is m: the attention is all on m
                proved[m, m, 0] = X.amax(-1)[0] < -slack
            flops += qs.numel() * n * 2
    certified = int((counts * proved).sum())
    flops += 2 * counts.numel()
    synchronize(device)
    seconds = time.perf_counter() - start_time
    total = n ** k
    name = "per_output" if per_output else "cubic"
    return Proof(name, certified / total, certified, total, int(flops), seconds, {"slack": slack, "classes": proved})


EARLIER_LABELS = ("m", "c", "b")  # an earlier position holds the max, the largest other token c, or one below c


def positional_classes(k: int) -> list[tuple[str, ...]]:
    """The label patterns of the k-1 earlier positions that `positional_proof` enumerates: each position
    holds m, c (the largest earlier token below m) or a token below c; a pattern with a 'b' needs a 'c'."""
    return [labels for labels in itertools.product(EARLIER_LABELS, repeat=k - 1) if "b" not in labels or "c" in labels]


def input_classes(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, ...]]]:
    """For inputs [N, k]: the maximum m, the largest earlier token below m (c, -1 when none) and each
    input's label pattern over the earlier positions (as in `positional_classes`)."""
    m = tokens.max(-1).values
    earlier = tokens[:, :-1]
    c = torch.where(earlier < m[:, None], earlier, -1).max(-1).values if earlier.shape[1] else torch.full_like(m, -1)
    names = [tuple("m" if t == mm else "c" if t == cc else "b" for t in row)
             for row, mm, cc in zip(earlier.tolist(), m.tolist(), c.tolist())]
    return m, c, names


@torch.no_grad()
def positional_proof(model: HookedToyTransformer, k: int) -> Proof:
    """A tighter mechanism proof with an exact worst case per class.

    Classes: the maximum m, the query q, which earlier positions hold m, which hold c (the largest
    earlier token below m) and which hold a token below c; c itself. Every class is a product of
    per-position token sets ({m}, {c} or {0..c-1}), and the query is fixed. For a wrong output o the
    input is right with margin `slack` exactly when sum_i w_i (VD_i[o] + DD[o] + slack) < 0, where
    w_i = exp(S[q, i, t_i]) > 0 (the softmax denominator is positive, so the sign of the logit
    difference is that of this sum). The sum is separable over positions, so its largest value over the
    class is the sum of each position's largest term: a prefix maximum over t < c for a 'below'
    position. The class is certified when that worst case is negative for every o != m, which is then
    true of every input in it (and the converse holds too: the worst case is attained)."""
    device = model_device(model)
    synchronize(device)
    start_time = time.perf_counter()
    paths = path_tables(model, k)
    D, V, S = paths.D, paths.V, paths.S
    n = model.cfg.d_vocab
    flops = paths.flops
    slack = _slack(paths)
    f64 = torch.float64
    W = torch.exp(S - S.amax((1, 2), keepdim=True))  # [q, p, t]: attention weights up to a factor per q
    flops += 3 * n * k * n
    patterns = positional_classes(k)
    proved = {labels: torch.zeros(n, n, n, dtype=torch.bool, device=device) for labels in patterns}  # [m, q, c]
    certified = 0
    idx = torch.arange(n, device=device)
    for m in range(n):
        wrong = idx != m
        # G[q, p, t, o]: w_p(t) times (token t at p favours o over m, plus the direct path and the slack)
        VD = V[:, :, wrong] - V[:, :, m, None]  # [p, t, o]
        DD = D[:, wrong] - D[:, m, None] + slack  # [q, o]
        G = W[..., None] * (VD[None] + DD[:, None, None])  # [q, p, t, o]
        flops += k * n * (n - 1) + 2 * n * (n - 1) + 2 * n * k * n * (n - 1)
        query = G[:, k - 1].diagonal(dim1=0, dim2=1).T  # [q, o]: the query token at the last position
        at_m = G[:, : k - 1, m]  # [q, p, o]
        at_c = G[:, : k - 1, :m].permute(0, 2, 1, 3)  # [q, c, p, o]
        # below[q, c, p, o]: the worst token t < c at p (-inf for c = 0: no such token)
        below = at_c
        if m:
            below = torch.cat([torch.full_like(at_c[:, :1], float("-inf")), at_c[:, :-1].cummax(1).values], 1)
        flops += n * (k - 1) * m * (n - 1)
        qs = slice(0, m + 1)  # the query is at most m
        for labels in patterns:
            if "c" in labels and m == 0:
                continue  # no token below 0
            # no earlier m: the query must be the max
            q_range = qs if "m" in labels else slice(m, m + 1)
            ncls = m if "c" in labels else 1
            total = query[q_range][:, None, :]  # [nq, 1, o]
            for p, label in enumerate(labels):
                if label == "m":
                    total = total + at_m[q_range, None, p]
                else:
                    total = total + (at_c if label == "c" else below)[q_range, :, p]
            worst = total.amax(-1)  # [nq, c or 1]
            nq = q_range.stop - q_range.start
            flops += nq * ncls * (n - 1) * (len(labels) + 1)
            ok = worst < 0
            if "c" in labels:
                proved[labels][m, q_range, :m] = ok if ok.shape[1] == m else ok.expand(nq, m)
                n_below = labels.count("b")
                sizes = torch.arange(m, device=device, dtype=torch.int64) ** n_below  # inputs per class: c^b
                certified += int((ok.expand(nq, m) * sizes).sum())
                flops += 2 * nq * m
            else:  # every earlier token is m: c does not exist; store the verdict at c = 0 and count 1 input
                proved[labels][m, q_range, 0] = ok[:, 0]
                certified += int(ok[:, 0].sum())
    synchronize(device)
    seconds = time.perf_counter() - start_time
    total = n ** k
    return Proof("positional", certified / total, certified, total, int(flops), seconds,
                 {"slack": slack, "classes": proved})


def positional_certified(proof: Proof, tokens: torch.Tensor) -> torch.Tensor:
    """Which of the inputs [N, k] the positional proof's classes certify."""
    m, c, names = input_classes(tokens)
    classes = proof.detail["classes"]
    q = tokens[:, -1]
    return torch.tensor([bool(classes[labels][mm, qq, max(cc, 0)]) for labels, mm, qq, cc
                         in zip(names, m.tolist(), q.tolist(), c.tolist())], dtype=torch.bool, device=HOST)


def prove_all(model: HookedToyTransformer, k: int, progress: bool = False, batch: int = 1 << 15) -> dict[str, Proof]:
    return {"brute_force": brute_force(model, k, batch=batch, progress=progress),
            "positional": positional_proof(model, k),
            "per_output": mechanism_proof(model, k, per_output=True),
            "cubic": mechanism_proof(model, k, per_output=False)}


# Analysis ----------------------------------------------------------------------------------------

LABELS = {"brute_force": "brute force (every input)", "positional": "mechanism, per position (exact per class)",
          "per_output": "mechanism, per output token",
          "cubic": "mechanism, cubic (worst terms apart)"}


@dataclass
class MaxOfKAnalysis:
    """Every proof's bound, cost and time on one trained model."""

    config: MaxOfKConfig
    proofs: dict[str, Proof]

    @property
    def accuracy(self) -> float:
        return self.proofs["brute_force"].bound

    @property
    def summary(self) -> dict:
        brute = self.proofs["brute_force"]
        out = {"d_vocab": self.config.d_vocab, "k": self.config.k, "inputs": brute.total, "accuracy": self.accuracy,
               "argmax_accuracy": brute.detail.get("argmax_accuracy")}
        for name, proof in self.proofs.items():
            out[f"{name}_bound"] = proof.bound
            out[f"{name}_flops"] = proof.flops
            out[f"{name}_seconds"] = round(proof.seconds, 4)
            if name != "brute_force":
                out[f"{name}_flops_ratio"] = proof.flops / brute.flops
                out[f"{name}_bound_ratio"] = proof.bound / self.accuracy if self.accuracy > 0 else None
        out["proofs"] = [{k: v for k, v in p.as_dict().items() if k not in ("margins", "classes")} for p in self.proofs.values()]
        return out

    def figure(self, path) -> None:
        """Bound against cost: log FLOPs on x, the certified accuracy on y, the true accuracy dashed."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.2), constrained_layout=True)
        colours = {"brute_force": "#444444", "positional": "#2f7d4f", "per_output": "#2f6fb3", "cubic": "#c2552b"}
        for name, proof in self.proofs.items():
            ax.scatter([proof.flops], [proof.bound], s=60, color=colours.get(name, "#2f7d4f"), zorder=3,
                       label=f"{LABELS.get(name, name)}: {proof.bound:.4f}")
        ax.axhline(self.accuracy, color="#999999", ls="--", lw=1, label=f"true accuracy {self.accuracy:.4f}")
        ax.set_xscale("log")
        ax.set_xlabel("proof cost (FLOPs, log scale)")
        ax.set_ylabel("proved lower bound on accuracy")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        ax.set_title(f"Max-of-{self.config.k}, d_vocab={self.config.d_vocab}: "
                     f"accuracy over all {self.proofs['brute_force'].total:,} inputs")
        fig.savefig(path, dpi=130, format="png")
        plt.close(fig)

    def sections(self) -> list:
        from ..report.page import Section

        buf = io.BytesIO()
        self.figure(buf)
        png = base64.b64encode(buf.getvalue()).decode("ascii")
        brute = self.proofs["brute_force"]
        rows = "".join(
            f"<tr><td>{html.escape(LABELS.get(name, name))}</td><td class='num'>{p.bound:.5f}</td>"
            f"<td class='num'>{p.certified:,}</td><td class='num'>{p.flops:.3g}</td>"
            f"<td class='num'>{p.flops / brute.flops:.2e}</td><td class='num'>{p.seconds:.3f}</td></tr>"
            for name, p in self.proofs.items())
        body = (f"<p class='note'>A one-layer attention-only model trained to output the largest of "
                f"{self.config.k} tokens from {self.config.d_vocab}. Each proof gives a lower bound on its accuracy "
                f"over all {brute.total:,} inputs: brute force runs every input; the mechanism proofs bound, for each "
                f"(maximum, query token, largest other token), the attention paid to tokens below the maximum and the "
                f"worst logit margin, and count the inputs whose worst case is still right; the per-position proof splits "
                f"the classes further by which earlier positions hold the maximum, the largest other token or a smaller "
                f"one, where the sign of each wrong-minus-right logit is a sum of one term per position, so the worst "
                f"case of each class is exact. FLOPs are counted from the "
                f"operations each proof does; times are wall-clock on the machine that ran the analysis.</p>"
                f"<img alt='proved bound against cost' style='max-width:100%' src='data:image/png;base64,{png}'>"
                f"<table><tr><th>proof</th><th>bound</th><th>inputs certified</th><th>FLOPs</th>"
                f"<th>FLOPs / brute force</th><th>seconds</th></tr>{rows}</table>")
        return [Section(id="max-of-k", title="Max-of-K: proved accuracy against proof cost", html=body)]

    def files(self) -> dict:
        return {"bound_vs_cost.png": self.figure}


def analyze(trained: MaxOfK, progress: bool = True) -> MaxOfKAnalysis:
    return MaxOfKAnalysis(trained.config, prove_all(trained.model, trained.config.k, progress=progress))


TOY = Toy(name=NAME, description="one-layer attention-only transformer outputs the max of K tokens; its accuracy "
                                 "proved by brute force and by cheaper proofs that use the mechanism (bound vs FLOPs)",
          config=MaxOfKConfig, train=train, load=load, analyze=analyze)
