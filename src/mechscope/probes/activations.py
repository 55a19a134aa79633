"""Activations of many texts at many hook points, read in one forward pass per batch.

Probes, CCS and steering vectors all start from the same thing: the activation of each text at one
position (its last token, a given token, or the mean over its tokens), at one or more hook points.
`collect` reads every hook point asked for in the same pass (one forward per batch for all layers,
not one per layer) and stops the pass after the deepest of them. Texts are tokenized with a BOS in
front and right-padded; positions count real tokens only.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..devices import HOST, batch_size_for, model_device
from ..errors import MechscopeError, check_count


class ActivationError(MechscopeError, ValueError):
    """An unknown hook point, an empty text list, or a position the texts do not have."""


class _Done(Exception):
    """Raised by the deepest hook to end a forward pass whose remaining layers nobody reads."""


def resid_points(model) -> list[str]:
    """The residual stream after every layer: `blocks.{l}.hook_resid_post`, l = 0 .. n_layers - 1."""
    return [f"blocks.{l}.hook_resid_post" for l in range(model.cfg.n_layers)]


def check_hook_points(model, hook_points: Sequence[str]) -> list[str]:
    """The hook points as a list, each checked against the model's (ActivationError naming the first
    unknown one, with examples of known names)."""
    points = [hook_points] if isinstance(hook_points, str) else list(hook_points)
    if not points:
        raise ActivationError("no hook point given")
    known = model.hook_dict
    for name in points:
        if name not in known:
            sample = ", ".join(n for n in resid_points(model)[:2])
            raise ActivationError(f"unknown hook point {name!r} for {model.cfg.model_name}; hook points are "
                                  f"TransformerLens names such as {sample}, blocks.0.attn.hook_z, blocks.0.hook_mlp_out")
    return points


def tokenize_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, a BOS (or EOS where there is none) in front."""
    from ..lens.text import _bos_id

    if not texts:
        raise ActivationError("no texts given")
    bos = _bos_id(tokenizer)
    out = []
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ActivationError(f"text {i} is empty")
        out.append([bos] + list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return out


def _layer_of(name: str) -> int:
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit() else -1


def _select(act: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor, position) -> torch.Tensor:
    """[batch, ...] activations at `position` of each row of `act` [batch, pos, ...]."""
    rows = torch.arange(act.shape[0], device=act.device)
    if position == "last":
        return act[rows, lengths - 1]
    if position == "mean":  # over real tokens after BOS
        keep = mask.clone()
        keep[:, 0] = False
        keep = keep.to(act.dtype).reshape(*keep.shape, *([1] * (act.dim() - 2)))
        return (act * keep).sum(1) / keep.sum(1).clamp_min(1)
    index = position + lengths if position < 0 else torch.full_like(lengths, position)
    return act[rows, index]


def padded(ids: Sequence[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [batch, width] token ids and their [batch, width] bool mask (True on real tokens)."""
    width = max(len(t) for t in ids)
    tokens = torch.full((len(ids), width), pad, dtype=torch.long, device=device)
    mask = torch.zeros(len(ids), width, dtype=torch.bool, device=device)
    for row, t in enumerate(ids):
        tokens[row, :len(t)] = torch.tensor(list(t), dtype=torch.long, device=device)
        mask[row, :len(t)] = True
    return tokens, mask


def pad_token(tokenizer, ids: Sequence[Sequence[int]]) -> int:
    """The tokenizer's padding id, or the first token (BOS) where it has none (masked out either way)."""
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else ids[0][0])


@torch.no_grad()
def prompt_logits(model, prompts: Sequence[str], batch_size: int | None = None) -> torch.Tensor:
    """[n_prompts, d_vocab] float32 logits (on the host) at each prompt's last token, the prompts
    tokenized with BOS in front and right-padded."""
    ids = tokenize_texts(model.tokenizer, list(prompts))
    device = model_device(model)
    batch_size = check_count("batch_size", batch_size_for(model, batch_size))
    pad = pad_token(model.tokenizer, ids)
    out = []
    for start in range(0, len(ids), batch_size):
        tokens, mask = padded(ids[start:start + batch_size], pad, device)
        logits = model(tokens, attention_mask=mask.long())
        rows = torch.arange(len(tokens), device=device)
        out.append(logits[rows, mask.sum(1) - 1].float().to(HOST))
    return torch.cat(out)


@torch.no_grad()
def collect(model, texts: Sequence[str] | Sequence[Sequence[int]], hook_points: Sequence[str] | str | None = None,
            position: int | str = "last", batch_size: int | None = None, progress: bool = True) -> dict[str, torch.Tensor]:
    """{hook point: [n_texts, *activation shape] float32 on the host}: each text's activation at
    `position` ("last" token, "mean" over the tokens after BOS, or an index into the text's tokens with
    BOS at 0; negative counts from its end) at every hook point (default: every layer's residual
    stream), all read in one forward pass per batch."""
    from tqdm.auto import tqdm

    points = check_hook_points(model, resid_points(model) if hook_points is None else hook_points)
    if isinstance(position, str) and position not in ("last", "mean"):
        raise ActivationError(f"position must be 'last', 'mean' or a token index, got {position!r}")
    ids = [list(map(int, t)) for t in texts] if texts and not isinstance(texts[0], str) else \
        tokenize_texts(model.tokenizer, texts)
    if not ids:
        raise ActivationError("no texts given")
    lengths_all = [len(t) for t in ids]
    if isinstance(position, int) and not all(-n <= position < n for n in lengths_all):
        short = min(range(len(ids)), key=lambda i: lengths_all[i])
        raise ActivationError(f"position {position} is outside text {short}, which has {lengths_all[short]} "
                              "tokens (BOS included)")
    batch_size = check_count("batch_size", batch_size_for(model, batch_size))
    device = model_device(model)
    pad = pad_token(model.tokenizer, ids)
    deepest = max(_layer_of(p) for p in points)
    last_layer = deepest if deepest >= 0 and all(_layer_of(p) >= 0 for p in points) else None
    stop_at = None
    if last_layer is not None and last_layer < model.cfg.n_layers - 1:
        stop_at = f"blocks.{last_layer}.hook_resid_post"
    out: dict[str, list[torch.Tensor]] = {p: [] for p in points}
    order = sorted(range(len(ids)), key=lambda i: lengths_all[i])  # similar lengths share a batch
    bar = tqdm(total=len(ids), desc="activations", unit="text", disable=not progress)
    for start in range(0, len(ids), batch_size):
        chunk = order[start:start + batch_size]
        tokens, mask = padded([ids[i] for i in chunk], pad, device)
        lengths = mask.sum(1)
        got: dict[str, torch.Tensor] = {}

        def keeper(name):  # the bridge's hooks may carry another name than the alias asked for
            def keep(act, hook):
                got[name] = _select(act, mask, lengths, position).to(HOST, torch.float32)
                if name == stop_at and len(got) == len(points):
                    raise _Done
                return act
            return keep

        def stop(act, hook):
            if len(got) == len(points):
                raise _Done
            return act

        hooks = [(p, keeper(p)) for p in points]
        if stop_at is not None and stop_at not in points:
            hooks.append((stop_at, stop))
        try:
            with model.hooks(fwd_hooks=hooks):
                model(tokens, attention_mask=mask.long())
        except _Done:
            pass
        for p in points:
            out[p].append(got[p])
        bar.update(len(chunk))
    bar.close()
    inverse = torch.empty(len(order), dtype=torch.long, device=HOST)
    inverse[torch.tensor(order, dtype=torch.long, device=HOST)] = torch.arange(len(order), device=HOST)
    return {p: torch.cat(v)[inverse] for p, v in out.items()}
