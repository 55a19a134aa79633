"""Feature dashboards: what each latent of a dictionary responds to and what it writes (method.md §11).

From held-out token sequences, in one streaming pass (batches of whole sequences, never more than one
batch of latents in memory besides fixed-size per-latent state), each latent gets:

  * its top-N activating tokens: (activation, sequence, position), with that latent's activations over
    a window of `before` tokens before and `after` tokens after the token (the window is cut out of the
    batch while the batch is in memory, so no second pass is needed);
  * a uniform sample of its firing tokens (`samples` per latent, with their windows), from which
    examples at activation quantiles are drawn. The sample is the `samples` firing tokens with the
    smallest hash keys, a key being a fixed integer hash of (token, latent): a uniform sample without
    replacement that does not depend on how the tokens are batched;
  * its firing density (fires / tokens), mean and maximum activation, and a histogram of its non-zero
    activations in log2 bins (`bins` equal bins over log2 activation in `log2_range`; activations
    outside the range go to the end bins);
  * its direct effect on the logits: the top promoted and suppressed output tokens (see `logit_effects`).

Per batch, everything is vectorised over latents, with no per-latent Python loop: the batch's firing
entries (dictionaries are sparse) are sorted by rank and stably by latent, which gives each latent's best
k of the batch; these are merged with the running best by a torch.topk over [2k, latents]. Ranks are
exact int64 (an activation's float bits, or the hash key, then the token id to break ties), so a
streamed pass keeps exactly the tokens a one-shot pass keeps. On one CPU thread a batch of 1,024 tokens
costs about 1.2 s for 16,384 latents (TopK, k = 32), besides the model's forward pass.

Skipped tokens: BOS and padding, as the activation buffer skips them (activations._keep_mask).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..devices import HOST, batch_size_for, model_device
from ..errors import MechscopeError, check_count
from .activations import _keep_mask, check_points, read_activations
from .dictionary import Dictionary

FORMAT, VERSION = "mechscope-dashboards", 1
TENSORS, META = "dashboards.safetensors", "dashboards.json"
FINAL = "ln_final.hook_in"


class DashboardError(MechscopeError, ValueError):
    """A dashboard that cannot be built or read (bad settings, a corrupt or foreign file)."""


@dataclass(frozen=True)
class DashboardConfig:
    """top: contexts kept per latent; samples: firing tokens sampled per latent (for quantile examples);
    before/after: the window around a token; bins and log2_range: the activation histogram; logit_tokens:
    promoted and suppressed tokens kept per latent."""

    top: int = 20
    samples: int = 32
    before: int = 10
    after: int = 4
    bins: int = 40
    log2_range: tuple[float, float] = (-10.0, 10.0)
    logit_tokens: int = 10

    def __post_init__(self):
        for name in ("top", "samples", "bins", "logit_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise DashboardError(f"dashboard config: {name} must be a positive integer, got {v!r}")
        for name in ("before", "after"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise DashboardError(f"dashboard config: {name} must be an integer >= 0, got {v!r}")
        lo, hi = self.log2_range
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise DashboardError(f"dashboard config: log2_range must be two finite numbers, low < high, got "
                                 f"{self.log2_range!r}")
        object.__setattr__(self, "log2_range", (float(lo), float(hi)))

    @property
    def window(self) -> int:
        return self.before + 1 + self.after


# ------------------------------------------------------------------------------------------------
# Streaming accumulation
# ------------------------------------------------------------------------------------------------


def sample_keys(token_ids: Tensor, latents: Tensor) -> Tensor:
    """int64 keys in [0, 2**31), elementwise: a fixed integer hash of (global token id, latent), in exact
    int64 arithmetic (every product stays below 2**63)."""
    m = 1 << 32
    h = (token_ids.to(torch.int64) * 2654435761 + latents.to(torch.int64) * 40503 + 12345) % m
    for _ in range(3):
        h = ((h ^ (h >> 16)) * 0x45D9F3B) % m
    return (h ^ (h >> 16)) >> 1


_LOW = (1 << 31) - 1  # token ids and keys below 2**31


class _TopSet:
    """The `k` highest-ranked tokens per latent so far, with their global token ids and windows: rank
    [k, L] (-1 = empty), token [k, L] (-1 = empty), value [k, L] (the activation), window [k, L, W].
    A rank is an exact int64: a non-negative int31 `primary` (larger first), then the smaller token id
    first, so any batching keeps the same tokens."""

    def __init__(self, k: int, n_latents: int, width: int, device):
        self.k = k
        self.rank = torch.full((k, n_latents), -1, dtype=torch.int64, device=device)
        self.token = torch.full((k, n_latents), -1, dtype=torch.int64, device=device)
        self.value = torch.zeros((k, n_latents), dtype=torch.float32, device=device)
        self.window = torch.zeros((k, n_latents, width), dtype=torch.float32, device=device)

    def merge(self, primary: Tensor, row: Tensor, col: Tensor, flat: Tensor, gid: Tensor, window_index: Tensor,
              window_ok: Tensor) -> None:
        """One batch's firing entries (row, col) of `flat` [tokens, L] with their `primary` keys; gid
        [tokens] global token ids, window_index [tokens, W] (rows of `flat`), window_ok [tokens, W].
        Works on the firing entries only (dictionaries are sparse): each latent's best k of the batch
        by sorting the entries by rank, then stably by latent; merged with the running best by topk."""
        k, L = self.k, flat.shape[1]
        dev = flat.device
        rank = (primary << 31) | (_LOW - gid[row])
        order = rank.argsort(descending=True, stable=True)
        order = order[col[order].argsort(stable=True)]
        row, col, rank = row[order], col[order], rank[order]
        counts = torch.bincount(col, minlength=L)
        slot = torch.arange(col.numel(), dtype=torch.int64, device=dev) - (counts.cumsum(0) - counts)[col]
        keep = slot < k
        row, col, rank, slot = row[keep], col[keep], rank[keep], slot[keep]
        r = torch.full((k, L), -1, dtype=torch.int64, device=dev)
        r[slot, col] = rank
        rows = torch.zeros((k, L), dtype=torch.int64, device=dev)
        rows[slot, col] = row
        latent = torch.arange(L, dtype=torch.int64, device=dev)
        found = r >= 0
        val = flat[rows, latent[None, :]] * found
        tok = torch.where(found, gid[rows], torch.full_like(rows, -1))
        W = window_index.shape[-1]
        win = flat[window_index[rows], latent[None, :, None].expand(k, L, W)] * window_ok[rows] * found[..., None]
        best, pick = torch.cat([self.rank, r]).topk(k, dim=0)
        self.rank = best
        self.token = torch.cat([self.token, tok]).gather(0, pick)
        self.value = torch.cat([self.value, val]).gather(0, pick)
        self.window = torch.cat([self.window, win]).gather(0, pick[..., None].expand(k, L, W))


class DashboardBuilder:
    """The per-latent state of a dashboard pass (module docstring); `update` once per batch of whole
    sequences, `finish` for the tensors. Lives on `device` (the latents')."""

    def __init__(self, n_latents: int, length: int, config: DashboardConfig, device):
        self.config, self.n_latents, self.length = config, n_latents, length
        self.device = torch.device(device)
        W = config.window
        self.top = _TopSet(config.top, n_latents, W, self.device)
        self.sample = _TopSet(config.samples, n_latents, W, self.device)
        self.count = torch.zeros(n_latents, dtype=torch.int64, device=self.device)
        self.total = torch.zeros(n_latents, dtype=torch.float64, device=self.device)
        self.hist = torch.zeros(n_latents * config.bins, dtype=torch.int64, device=self.device)
        self.n_tokens = 0
        offsets = torch.arange(-config.before, config.after + 1, dtype=torch.int64, device=self.device)
        self._offsets = offsets

    @torch.no_grad()
    def update(self, latents: Tensor, sequences: Tensor, keep: Tensor) -> None:
        """latents [b, T, L] of sequences `sequences` [b] (their rows in the token set), keep [b, T]: the
        positions that count (not BOS or padding)."""
        b, T, L = latents.shape
        if L != self.n_latents or T != self.length:
            raise DashboardError(f"latents of shape {tuple(latents.shape)} do not fit a dashboard of "
                                 f"{self.n_latents} latents over sequences of {self.length} tokens")
        c = self.config
        dev = self.device
        keep = keep.to(dev)
        flat = latents.to(dev, torch.float32).reshape(b * T, L) * keep.reshape(-1, 1)
        pos = torch.arange(T, dtype=torch.int64, device=dev)
        gid = (sequences.to(dev, torch.int64)[:, None] * T + pos[None, :]).reshape(-1)      # [b*T]
        fired = flat > 0
        self.n_tokens += int(keep.sum())
        self.count += fired.sum(0)
        self.total += flat.sum(0, dtype=torch.float64)
        # histogram of the non-zero activations in log2 bins
        lo, hi = c.log2_range
        row, col = fired.nonzero(as_tuple=True)
        which = ((flat[row, col].log2() - lo) / (hi - lo) * c.bins).floor().clamp(0, c.bins - 1).long()
        self.hist.index_add_(0, col * c.bins + which, torch.ones_like(which))
        # windows: rows of `flat` around each token, within its own sequence
        at = pos[:, None] + self._offsets[None, :]                                         # [T, W]
        ok = ((at >= 0) & (at < T))[None].expand(b, T, -1)
        index = (torch.arange(b, dtype=torch.int64, device=dev)[:, None, None] * T + at.clamp(0, T - 1)[None])
        index, ok = index.reshape(b * T, -1), ok.reshape(b * T, -1).to(flat.dtype)
        bits = flat[row, col].view(torch.int32).to(torch.int64)  # non-negative floats order as their bits
        self.top.merge(bits, row, col, flat, gid, index, ok)
        self.sample.merge(_LOW - sample_keys(gid[row], col), row, col, flat, gid, index, ok)

    def finish(self) -> dict[str, Tensor]:
        """The accumulated tensors, latent-major, on the host."""
        def lm(t):  # [k, L, ...] -> [L, k, ...]
            return t.transpose(0, 1).contiguous().to(HOST)

        return {"count": self.count.to(HOST), "total": self.total.to(HOST),
                "hist": self.hist.reshape(self.n_latents, self.config.bins).to(HOST),
                "top_value": lm(self.top.value), "top_token": lm(self.top.token), "top_window": lm(self.top.window),
                "sample_value": lm(self.sample.value), "sample_token": lm(self.sample.token),
                "sample_window": lm(self.sample.window)}


# ------------------------------------------------------------------------------------------------
# The direct effect on the logits
# ------------------------------------------------------------------------------------------------


def output_directions(model, sae: Dictionary) -> tuple[Tensor | None, str]:
    """(directions [L, d_model] each latent writes into the residual stream, how they were found) or
    (None, why not). A dictionary writing a residual-width hook point (resid_*, mlp_out, attn_out, a
    transcoder's MLP output) writes its decoder row; one of attention `hook_z` its decoder row through
    that layer's W_O (heads flattened head-major, as the buffer flattens them); a crosscoder the row of
    its last hook point."""
    c = sae.config
    w = sae.W_dec.detach()
    point = c.out_hook_point if c.is_transcoder else c.hook_point
    if c.architecture == "crosscoder":
        w, point = w[:, -1], c.hook_points[-1]
    d_model = int(model.cfg.d_model)
    if point and point.endswith("attn.hook_z"):
        layer = int(point.split(".")[1])
        W_O = model.blocks[layer].attn.W_O.detach()           # [n_heads, d_head, d_model]
        return w.to(W_O.dtype) @ W_O.reshape(-1, d_model), f"decoder rows through W_O of layer {layer}"
    if w.shape[-1] != d_model:
        return None, f"{point} has width {w.shape[-1]}, not the residual stream's {d_model}"
    return w, f"decoder rows as writes to the residual stream at {point}"


def norm_scale(model, final: Tensor) -> Tensor:
    """The final norm's scale of final-residual vectors [..., d]: sqrt(mean((x - mean x)^2) + eps) for
    LayerNorm, sqrt(mean(x^2) + eps) for RMSNorm, 1 without a norm."""
    kind = (getattr(model.cfg, "normalization_type", None) or "").upper()
    if not kind:
        return torch.ones(final.shape[:-1], dtype=final.dtype, device=final.device)
    x = final - final.mean(-1, keepdim=True) if kind.startswith("LN") else final
    return (x.pow(2).mean(-1) + float(model.cfg.eps)).sqrt()


@torch.no_grad()
def logit_effects(model, directions: Tensor, scale: float, k: int, chunk: int = 1024):
    """(promoted ids, promoted logits, suppressed ids, suppressed logits), each [L, k]: the logits' change
    when a latent adds its direction d (activation 1) to the final residual stream with the final norm's
    scale frozen at `scale` (its mean over the held-out tokens): P(d) · W_U / scale, where P centres
    for LayerNorm and is the identity for RMSNorm, and W_U has the norm's weight folded in (the models
    are loaded so; b_U is the same for every latent and left out)."""
    kind = (getattr(model.cfg, "normalization_type", None) or "").upper()
    W_U = model.W_U.detach()
    k = min(k, int(W_U.shape[1]))
    out = [[], [], [], []]
    for start in range(0, directions.shape[0], chunk):
        d = directions[start:start + chunk].to(W_U.device, W_U.dtype)
        if kind.startswith("LN"):
            d = d - d.mean(-1, keepdim=True)
        logits = (d @ W_U) / scale
        up, down = logits.topk(k, dim=-1), (-logits).topk(k, dim=-1)
        for slot, t in zip(out, (up.indices, up.values, down.indices, -down.values)):
            slot.append(t.to(HOST))
    return tuple(torch.cat(t) for t in out)


# ------------------------------------------------------------------------------------------------
# Dashboards
# ------------------------------------------------------------------------------------------------


@dataclass
class Dashboards:
    """Every latent's dashboard (module docstring). tokens: the held-out sequences [n, T] (host);
    strings: {token id: text} for every id shown; tensors: see DashboardBuilder.finish plus promoted_*
    and suppressed_* ([L, k]); meta: the dictionary, model, token counts, how logits were computed."""

    config: DashboardConfig
    tokens: Tensor
    strings: dict[int, str]
    tensors: dict[str, Tensor]
    meta: dict = field(default_factory=dict)

    @property
    def n_latents(self) -> int:
        return int(self.tensors["count"].shape[0])

    @property
    def density(self) -> Tensor:
        return self.tensors["count"].to(torch.float64) / max(1, int(self.meta["n_tokens"]))

    @property
    def max_activation(self) -> Tensor:
        return self.tensors["top_value"][:, 0]

    @property
    def mean_activation(self) -> Tensor:
        """Mean activation over the tokens a latent fires on (0 for dead latents)."""
        c = self.tensors["count"]
        return torch.where(c > 0, self.tensors["total"] / c.clamp(min=1), torch.zeros_like(self.tensors["total"]))

    def hist_edges(self) -> Tensor:
        """The histogram's bin edges [bins + 1] in activation units (2 ** the log2 edges)."""
        lo, hi = self.config.log2_range
        return 2.0 ** torch.linspace(lo, hi, self.config.bins + 1, dtype=torch.float64, device=HOST)

    def contexts(self, latent: int, which: str = "top") -> list[dict]:
        """Readable examples of one latent: [{activation, sequence, position, tokens, activations}]
        (`which` = "top" or "sample"), the window's tokens as text."""
        c, T = self.config, int(self.tokens.shape[1])
        out = []
        t = self.tensors
        for v, g, w in zip(t[f"{which}_value"][latent].tolist(), t[f"{which}_token"][latent].tolist(),
                           t[f"{which}_window"][latent].tolist()):
            if g < 0:
                continue
            s, p = divmod(g, T)
            lo, hi = max(0, p - c.before), min(T, p + c.after + 1)
            ids = self.tokens[s, lo:hi].tolist()
            out.append({"activation": v, "sequence": s, "position": p, "tokens": [self.strings[i] for i in ids],
                        "activations": w[lo - (p - c.before):hi - (p - c.before)]})
        return out

    def quantile_indices(self, bands: int = 4, per_band: int = 2) -> Tensor:
        """[L, bands * per_band] indices into each latent's samples (-1 = none): the samples sorted by
        activation, cut into `bands` equal-count bands (lowest first), `per_band` evenly spaced in each."""
        value, token = self.tensors["sample_value"], self.tensors["sample_token"]
        L, R = value.shape
        order = torch.where(token >= 0, value, torch.full_like(value, math.inf)).argsort(dim=1, stable=True)
        n = (token >= 0).sum(1)                                                   # [L]
        j = torch.arange(bands * per_band, dtype=torch.float64, device=HOST)
        band, slot = (j // per_band), (j % per_band)
        frac = (band + (slot + 0.5) / per_band) / bands                           # centres in [0, 1)
        at = (frac[None, :] * n[:, None]).floor().long().clamp(max=R - 1)
        picked = order.gather(1, at)
        # where a latent has fewer samples than examples asked for, repeats are dropped
        dup = torch.zeros_like(picked, dtype=torch.bool)
        dup[:, 1:] = picked[:, 1:] == picked[:, :-1]
        return torch.where((n[:, None] > 0) & ~dup, picked, torch.full_like(picked, -1))

    # -- files --------------------------------------------------------------------------------
    def save(self, path, overwrite: bool = False) -> Path:
        """A directory with dashboards.safetensors (the tensors and tokens) and dashboards.json (config,
        meta, token strings), written atomically."""
        from ..fileio import atomic_dir

        path = Path(path)
        if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not overwrite)):
            raise DashboardError(f"{path}: exists and is not an empty directory (pass overwrite=True to replace it)")
        with atomic_dir(path, error=DashboardError, replace=overwrite) as tmp:
            self.write_files(tmp)
        return path

    def write_files(self, folder: Path) -> None:
        self.write_tensors(Path(folder) / TENSORS)
        self.write_meta(Path(folder) / META)

    def files(self) -> dict:
        """{file name: writer(path)} for report.write.write_sections: a report directory that also
        loads as a dashboards directory."""
        return {TENSORS: self.write_tensors, META: self.write_meta}

    def write_tensors(self, file: Path) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.contiguous() for k, v in self.tensors.items()}
        tensors["tokens"] = self.tokens.contiguous()
        save_file(tensors, str(file), metadata={"format": FORMAT})

    def write_meta(self, file: Path) -> None:
        data = {"format": FORMAT, "version": VERSION, "config": asdict(self.config), "meta": self.meta,
                "strings": {str(k): v for k, v in self.strings.items()}}
        Path(file).write_text(json.dumps(data, separators=(",", ":")), encoding="utf-8")

    @classmethod
    def load(cls, path) -> "Dashboards":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        meta_file, tensor_file = path / META, path / TENSORS
        for f in (meta_file, tensor_file):
            if not f.is_file():
                raise DashboardError(f"{path}: not a dashboards directory (no {f.name})")
        try:
            data = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DashboardError(f"{meta_file}: not readable JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
            raise DashboardError(f"{meta_file}: not a mechscope dashboards file (format {FORMAT} version {VERSION})")
        try:
            tensors = load_file(str(tensor_file), device="cpu")
            config = DashboardConfig(**{**data["config"], "log2_range": tuple(data["config"]["log2_range"])})
            strings = {int(k): str(v) for k, v in data["strings"].items()}
        except (SafetensorError, OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
            raise DashboardError(f"{path}: unreadable dashboards ({exc})") from None
        missing = sorted({"tokens", "count", "hist", "top_value", "top_token", "top_window", "sample_value",
                          "sample_token", "sample_window"} - set(tensors))
        if missing:
            raise DashboardError(f"{tensor_file}: missing tensor(s) {', '.join(missing)}")
        tokens = tensors.pop("tokens")
        return cls(config, tokens, strings, tensors, data.get("meta") or {})

    def section(self, **kwargs):
        """The report section (report/sections/dashboard.py)."""
        from ..report.sections.dashboard import section

        return section(self, **kwargs)


def _strings(tokenizer, ids) -> dict[int, str]:
    ids = sorted({int(i) for i in ids})
    texts = tokenizer.batch_decode([[i] for i in ids]) if ids else []
    return dict(zip(ids, texts))


@torch.no_grad()
def compute_dashboards(model, sae: Dictionary, tokens: Tensor, *, config: DashboardConfig | None = None,
                       attention_mask: Tensor | None = None, batch_size: int | None = None,
                       progress: bool = True) -> Dashboards:
    """Dashboards of every latent of `sae` on `model` over held-out `tokens` [n, T] (see the module
    docstring): one pass, batches of `batch_size` sequences (the model's default), reading the
    dictionary's hook point(s) and the final residual (for the norm's scale) in the same forward pass."""
    config = config or DashboardConfig()
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int) \
            or tokens.numel() == 0:
        raise DashboardError("tokens must be a non-empty [sequences, length] tensor of token ids")
    c = sae.config
    inputs = list(c.hook_points) if c.architecture == "crosscoder" else [c.hook_point]
    check_points(model, inputs)
    final = [FINAL] if FINAL in model.hook_dict and getattr(model.cfg, "normalization_type", None) else []
    tokens = tokens.to(HOST, torch.long)
    if tokens.numel() >= 1 << 31:
        raise DashboardError(f"at most 2**31 - 1 held-out tokens, got {tokens.numel():,}")
    mask = None if attention_mask is None else attention_mask.to(HOST)
    keep, skipped_bos, skipped_pad = _keep_mask(tokens, mask, model.tokenizer)
    n, T = tokens.shape
    device = model_device(model)
    builder = DashboardBuilder(c.d_sae, int(T), config, sae.device)
    scale_sum, scale_n = 0.0, 0
    step = batch_size_for(model, batch_size)
    check_count("batch_size", step)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="dashboards", unit="seq", file=sys.stderr)
    for start in range(0, n, step):
        rows = torch.arange(start, min(n, start + step), dtype=torch.long, device=HOST)
        acts = read_activations(model, tokens[rows].to(device), inputs + final,
                                None if mask is None else mask[rows].to(device))
        x = torch.stack([acts[p] for p in inputs], dim=-2) if c.architecture == "crosscoder" else acts[inputs[0]]
        k = keep[rows]
        builder.update(sae.encode(x.to(sae.device)), rows, k)
        if final:
            r = norm_scale(model, acts[FINAL].to(torch.float64))[k.to(device)]
            scale_sum += float(r.sum())
            scale_n += int(r.numel())
        if bar is not None:
            bar.update(len(rows))
    if bar is not None:
        bar.close()
    tensors = builder.finish()
    scale = scale_sum / scale_n if scale_n else 1.0
    directions, how = output_directions(model, sae)
    shown = set(tokens.unique().tolist())
    if directions is not None:
        up, up_v, down, down_v = logit_effects(model, directions, scale, config.logit_tokens)
        tensors.update(promoted_token=up, promoted_logit=up_v.float(), suppressed_token=down,
                       suppressed_logit=down_v.float())
        shown |= set(up.unique().tolist()) | set(down.unique().tolist())
    meta = {"model": getattr(model.cfg, "model_name", ""), "hook_point": c.hook_point,
            "architecture": c.architecture, "d_sae": c.d_sae, "n_sequences": int(n), "length": int(T),
            "n_tokens": builder.n_tokens, "skipped_bos": skipped_bos, "skipped_padding": skipped_pad,
            "norm_scale": scale,
            "logits": (f"{how}; logits = P(d)·W_U / r, P centring for LayerNorm (identity for RMSNorm), "
                       f"W_U with the final norm's weight folded in, r = {scale:.4g} the final norm's mean "
                       f"scale on these tokens (frozen); b_U left out") if directions is not None
            else f"no logit effects: {how}"}
    return Dashboards(config, tokens, _strings(model.tokenizer, shown), tensors, meta)


__all__ = ["DashboardBuilder", "DashboardConfig", "DashboardError", "Dashboards", "compute_dashboards",
           "logit_effects", "norm_scale", "output_directions", "sample_keys"]
