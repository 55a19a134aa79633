"""Activations for training dictionaries: a shuffled buffer of bounded size, refilled from the model.

`ActivationBuffer` reads one or more hook points of a model over a set of token sequences and hands
out shuffled batches of single-position activations, on the model's device:

  * one hook point (an SAE): batches `[batch, d]`;
  * several hook points stacked (a crosscoder, `stack=[...]`): `[batch, n_hooks, d]` (equal widths);
  * an input and a target hook point (a transcoder, `target=...`): pairs `([batch, d_in], [batch, d_out])`,
    both read at the same positions in the same forward pass.

Activations with more than one dimension per position (attention `hook_z`, `[n_heads, d_head]`) are
flattened to one vector (`n_heads * d_head`, head-major). Each forward pass stops right after the last
hook point the buffer reads, so the layers after it are never run. Residual-stream hook points
(`blocks.L.hook_resid_pre/post`) of a bridge are read by transformers' own modules with fused attention
(mechscope.plain_pass, about 1.4x faster on SmolLM2), once a first comparison with the bridge's pass on
two of the sequences agrees; otherwise, with `plain=False`, or while hooks are attached to the model,
the bridge's pass is used.

Bounded memory: the buffer holds at most `buffer_size` positions. It is filled from the model, shuffled,
and batches are taken from it until half of it is spent; then it is topped up from the next sequences
and shuffled again (so every batch mixes positions of many sequences and of several fills). A forward
pass reads only as many sequences as fit in the free space, so the buffer plus one forward pass's
activations is all the memory it needs. After the last sequence the rest is handed out (a last,
smaller batch unless `drop_last`); with `loop=True` it starts over with the sequences in a new order.

Skipped positions: every position holding the BOS token (the first of each sequence, whose activations
are outliers that dictionaries should not spend latents on), and padding (an `attention_mask` of 0; with
no mask, the tokenizer's pad token where it differs from its BOS and EOS tokens). The buffer says how
many once (`note`, printed when `progress`).

Text comes from `training_tokens`: the user's text (a .txt, .jsonl or `datasets` directory; a list of
strings) cut into fixed-length sequences with BOS first, token ids the user made, or by default text
sampled from the model with a fixed seed and cached (mechscope.lens.text).
"""

from __future__ import annotations

import os
import re
import sys
from typing import Iterator, Sequence

import torch

from .. import distributed
from ..devices import HOST, batch_size_for, model_device
from ..errors import MechscopeError, ParameterError, check_count
from ..plain_pass import agrees, read_residual, residual_points
from ..lens.text import TextError, _bos_id, load_text, sampled_text, tokenize_text


class ActivationError(MechscopeError, ValueError):
    """An unknown hook point, hook points that cannot be stacked, or text with no usable position."""


class _Done(Exception):
    """Raised by the last hook read to end a forward pass whose remaining layers nobody reads."""


# ------------------------------------------------------------------------------------------------
# Hook points
# ------------------------------------------------------------------------------------------------

# The hook points worth naming when one is unknown: the residual stream, MLP and attention of each layer.
_SHOWN = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_mlp_in", "hook_mlp_out", "hook_attn_out",
          "attn.hook_z", "ln2.hook_normalized")


def valid_hook_points(model) -> str:
    """A short list of the model's usual hook points for dictionaries, layers written as a range."""
    n = model.cfg.n_layers
    layers = "0" if n == 1 else f"0..{n - 1}"
    known = model.hook_dict
    shown = [s for s in _SHOWN if f"blocks.0.{s}" in known]
    return f"blocks.{{{layers}}}.{{{', '.join(shown)}}}"


def check_points(model, points: Sequence[str]) -> list[str]:
    """The hook points as a list; ActivationError naming an unknown one and listing the usual ones."""
    points = [points] if isinstance(points, str) else list(points)
    if not points:
        raise ActivationError("no hook point given")
    for name in points:
        if not isinstance(name, str) or name not in model.hook_dict:
            raise ActivationError(f"unknown hook point {name!r} for {model.cfg.model_name}; valid hook points "
                                  f"include {valid_hook_points(model)} (every name in model.hook_dict works)")
    return points


def _enable(model, points: Sequence[str]) -> None:
    """Switch on the bridge's optional hooks (hook_mlp_in, split q/k/v inputs, ...) the points need."""
    reason = getattr(model, "_gated_hook_reason", None)
    if reason is None:
        return
    for name in points:
        flag = reason(name)
        if flag is not None:
            getattr(model, f"set_{flag}")(True)


def read_activations(model, tokens: torch.Tensor, points: Sequence[str],
                     attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """{hook point: [batch, pos, width]} of one forward pass over `tokens` (on the model's device),
    each activation flattened after the position; the pass stops after the last of `points`."""
    got: dict[str, torch.Tensor] = {}
    wanted = set(points)

    def keeper(name):
        def keep(act, hook):
            got[name] = act.detach().reshape(act.shape[0], act.shape[1], -1)
            if wanted <= got.keys():
                raise _Done
            return act
        return keep

    _enable(model, points)
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask.long()}
    try:
        with torch.no_grad(), model.hooks(fwd_hooks=[(p, keeper(p)) for p in dict.fromkeys(points)]):
            model(tokens, **kwargs)
    except _Done:
        pass
    missing = [p for p in points if p not in got]
    if missing:
        raise ActivationError(f"hook point {missing[0]!r} did not run in the forward pass of {model.cfg.model_name}")
    return got


def hook_widths(model, points: Sequence[str]) -> dict[str, int]:
    """{hook point: width of one position's activation, flattened} from a forward pass over two tokens."""
    points = check_points(model, points)
    bos = _bos_id(model.tokenizer)
    tokens = torch.full((1, 2), bos, dtype=torch.long, device=model_device(model))
    return {p: int(a.shape[-1]) for p, a in read_activations(model, tokens, points).items()}


# ------------------------------------------------------------------------------------------------
# Text
# ------------------------------------------------------------------------------------------------


def training_tokens(model, text=None, length: int = 128, count: int | None = None, seed: int = 0,
                    progress: bool = True) -> torch.Tensor:
    """[n, length] token ids (host) to read activations from, BOS first in each sequence:
    `text` a path (.txt, .jsonl, `datasets` directory) or a list of documents, cut into sequences (all
    of it, or the first `count`); None: `count` (default 64) sequences sampled from the model with
    `seed`, cached. TextError naming the source when there is no text."""
    check_count("length", length, 2)
    if text is None:
        return sampled_text(model, length=length, count=64 if count is None else count, seed=seed,
                            progress=progress)
    if isinstance(text, (str, os.PathLike)):
        return load_text(text, model.tokenizer, length, count)
    docs = list(text)
    if not all(isinstance(d, str) for d in docs):
        raise TextError("training text: give a path, a list of strings or token ids")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise TextError("training text: the list of documents is empty (or holds only blank strings)")
    return tokenize_text(docs, model.tokenizer, length, count, source="training text")


def _keep_mask(tokens: torch.Tensor, attention_mask: torch.Tensor | None, tokenizer) -> tuple[torch.Tensor, int, int]:
    """Positions to read ([n, length] bool, host), and how many were skipped as BOS and as padding."""
    bos = _bos_id(tokenizer)
    if attention_mask is not None:
        pad = attention_mask.to(HOST) == 0
    else:
        pad_id = getattr(tokenizer, "pad_token_id", None)
        specials = {bos, getattr(tokenizer, "eos_token_id", None)}
        if pad_id is not None and pad_id not in specials:
            pad = tokens == pad_id
        else:
            pad = torch.zeros_like(tokens, dtype=torch.bool)
    is_bos = (tokens == bos) & ~pad
    return ~(pad | is_bos), int(is_bos.sum()), int(pad.sum())


# ------------------------------------------------------------------------------------------------
# The buffer
# ------------------------------------------------------------------------------------------------


class ActivationBuffer:
    """Shuffled batches of activations (see the module docstring). Iterate over it; each iteration
    starts from the beginning of the token set with the same seed (so two iterations are identical).

    model: a loaded model (bridge or HookedRootModule). hook_point: the hook point read, or a list of
    them to stack (crosscoders). target: a second hook point for transcoders (pairs are yielded).
    tokens: [n, length] token ids (see `training_tokens`), with `attention_mask` (0 = padding) when padded.
    batch_size: positions per batch. buffer_size: at most this many positions held (default 32 batches or
    the tokens' kept positions, whichever is fewer; at least 2 x (batch_size + length)).
    model_batch_size: sequences per forward pass at most.
    positions: also yield the [batch, 2] (sequence, position) of each row. dtype: of the yielded rows.
    shard: read only this rank's share of the sequences (those i with i % world == rank) and yield this
    rank's part of every batch (batch_size split among the ranks, so one step over all ranks still holds
    batch_size positions); None (default): shard when a data-parallel run is active (distributed.py)."""

    def __init__(self, model, hook_point: str | Sequence[str], tokens: torch.Tensor, *, target: str | None = None,
                 attention_mask: torch.Tensor | None = None, batch_size: int = 1024, buffer_size: int | None = None,
                 model_batch_size: int | None = None, seed: int = 0, shuffle: bool = True, drop_last: bool = False,
                 loop: bool = False, positions: bool = False, dtype: torch.dtype = torch.float32,
                 progress: bool = True, plain: bool = True, shard: bool | None = None):
        self.model = model
        self.stacked = not isinstance(hook_point, str)
        if self.stacked and target is not None:
            raise ActivationError("a target hook point (transcoder) goes with one input hook point, not a stack")
        self.inputs = check_points(model, hook_point)
        if self.stacked and len(set(self.inputs)) != len(self.inputs):
            raise ActivationError(f"a hook point is stacked twice: {', '.join(self.inputs)}")
        self.target = None if target is None else check_points(model, [target])[0]
        self.points = list(dict.fromkeys(self.inputs + ([self.target] if self.target else [])))
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int):
            raise ActivationError("tokens must be a [sequences, length] tensor of token ids (see training_tokens)")
        if tokens.numel() == 0:
            raise TextError("training text: no token sequences given")
        if attention_mask is not None and attention_mask.shape != tokens.shape:
            raise ActivationError(f"attention_mask has shape {tuple(attention_mask.shape)}, the tokens "
                                  f"{tuple(tokens.shape)}")
        self.tokens = tokens.to(HOST, torch.long)
        self.attention_mask = None if attention_mask is None else attention_mask.to(HOST)
        self.keep, self.skipped_bos, self.skipped_padding = _keep_mask(self.tokens, self.attention_mask,
                                                                        model.tokenizer)
        self.kept_per_sequence = self.keep.sum(1)
        self.batch_size = check_count("batch_size", batch_size)
        self.sequences = self._shard(shard)  # the sequences this process reads
        self.total = int(self.kept_per_sequence[self.sequences].sum())
        if self.total == 0:
            mine = "" if len(self.sequences) == len(self.tokens) else " in this rank's share"
            raise TextError(f"training text: every one of its {self.tokens[self.sequences].numel()} positions"
                            f"{mine} is BOS or padding")
        length = int(self.tokens.shape[1])
        least = 2 * (self.batch_size + length)
        # default: 32 batches, but never more than one pass over the tokens (with `loop`, a larger buffer
        # would read sequences again before training has used them once)
        self.buffer_size = max(min(32 * self.batch_size, self.total), least) if buffer_size is None else \
            check_count("buffer_size", buffer_size)
        if self.buffer_size < least:
            raise ParameterError(f"buffer_size must be at least 2 x (batch_size + sequence length) = {least}, "
                                 f"got {self.buffer_size}")
        self.model_batch_size = batch_size_for(model, model_batch_size)
        self.seed, self.shuffle, self.drop_last, self.loop = seed, shuffle, drop_last, loop
        self.positions, self.dtype = positions, dtype
        self.device = model_device(model)
        # residual-stream points of a bridge are read by the plain transformers pass (mechscope.plain_pass)
        # once a first comparison with the bridge's own pass agrees; None = not yet compared
        self.plain: bool | None = None if plain and residual_points(self.points) is not None else False
        self.max_held = 0  # the most positions the buffer has held (never above buffer_size)
        self.note = (f"activations: skipping {self.skipped_bos} BOS and {self.skipped_padding} padding positions "
                     f"of {self.tokens.numel()}; {self.total} positions remain")
        if progress:
            print(self.note, file=sys.stderr)

    def _shard(self, shard: bool | None) -> torch.Tensor:
        """All sequence indices, or this rank's (i % world == rank) with this rank's part of batch_size."""
        n = int(self.tokens.shape[0])
        if shard is None:
            shard = distributed.active() and distributed.world_size() > 1
        if not shard:
            return torch.arange(n, device=HOST)
        world = distributed.world_size()
        if n < world or self.batch_size < world:
            raise ActivationError(f"{n} sequences and batch_size {self.batch_size} cannot be shared among {world} "
                                  "ranks: give each rank at least one sequence and one position per batch")
        self.batch_size = len(distributed.shard(self.batch_size))
        return torch.tensor(distributed.shard(n, "strided"), dtype=torch.long, device=HOST)

    def __len__(self) -> int:
        """Batches in one pass over the tokens."""
        full, rest = divmod(self.total, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def _sequences(self, gen: torch.Generator) -> Iterator[int]:
        n = int(self.sequences.shape[0])
        while True:
            order = torch.randperm(n, generator=gen, device=HOST) if self.shuffle else torch.arange(n, device=HOST)
            yield from (int(i) for i in self.sequences[order])
            if not self.loop:
                return

    def _read(self, seqs: list[int]) -> list[torch.Tensor]:
        """The kept rows of these sequences: [inputs (, target), (sequence, position)] on the device."""
        index = torch.tensor(seqs, dtype=torch.long, device=HOST)
        tokens = self.tokens[index].to(self.device)
        mask = None if self.attention_mask is None else self.attention_mask[index].to(self.device)
        acts = self._activations(tokens, mask)
        keep = self.keep[index].to(self.device)
        if self.stacked:
            widths = {p: acts[p].shape[-1] for p in self.inputs}
            if len(set(widths.values())) > 1:
                raise ActivationError("stacked hook points must have the same width: "
                                      + ", ".join(f"{p} ({w})" for p, w in widths.items()))
            rows = [torch.stack([acts[p] for p in self.inputs], dim=2)[keep]]
        else:
            rows = [acts[self.inputs[0]][keep]]
        if self.target is not None:
            rows.append(acts[self.target][keep])
        where = keep.nonzero()  # (row in this chunk, position), row-major like the rows above
        where[:, 0] = index.to(self.device)[where[:, 0]]
        return [r.to(self.dtype) for r in rows] + [where]

    def _activations(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if self.plain is False or _hooked(self.model):
            return read_activations(self.model, tokens, self.points, mask)
        try:
            fast = read_residual(self.model, tokens, self.points, mask)
        except LookupError:
            self.plain = False
            return read_activations(self.model, tokens, self.points, mask)
        if self.plain is None:  # the first read: trust the plain pass only where it gives the bridge's numbers
            few = slice(0, 2)
            ref = read_activations(self.model, tokens[few], self.points, None if mask is None else mask[few])
            self.plain = all(agrees(_masked(ref[p], mask, few), _masked(fast[p][few], mask, few))
                             for p in self.points)
            if not self.plain:
                return read_activations(self.model, tokens, self.points, mask)
        return fast

    def __iter__(self):
        gen = torch.Generator(device=HOST).manual_seed(self.seed)
        sequences = self._sequences(gen)
        pending: int | None = next(sequences, None)
        store: list[torch.Tensor] | None = None  # allocated at the first read, when the widths are known
        held = 0
        cap, half = self.buffer_size, self.buffer_size // 2
        while True:
            # Top up: forward passes over as many sequences as fit in the free space.
            while pending is not None:
                chunk, room = [], cap - held
                while pending is not None and len(chunk) < self.model_batch_size:
                    need = int(self.kept_per_sequence[pending])
                    if need > room:
                        break
                    chunk.append(pending)
                    room -= need
                    pending = next(sequences, None)
                if not chunk:
                    break
                rows = self._read(chunk)
                if store is None:
                    store = [torch.empty((cap, *r.shape[1:]), dtype=r.dtype, device=self.device) for r in rows]
                k = rows[0].shape[0]
                for s, r in zip(store, rows):
                    s[held:held + k] = r
                held += k
                self.max_held = max(self.max_held, held)
            if held == 0:
                return
            if self.shuffle:
                perm = torch.randperm(held, generator=gen, device=HOST).to(self.device)
                for s in store:
                    s[:held] = s[:held][perm]
            # Hand out batches from the end until half is spent (all of it after the last sequence).
            floor = half if pending is not None else 0
            while held - self.batch_size >= floor or (pending is None and held and not self.drop_last):
                take = min(self.batch_size, held)
                if pending is None and take < self.batch_size and self.drop_last:
                    break
                out = [s[held - take:held].clone() for s in store]
                held -= take
                yield self._package(out)
            if pending is None:
                return

    def _package(self, out: list[torch.Tensor]):
        acts = out[:-1]
        batch = acts[0] if len(acts) == 1 else (acts[0], acts[1])
        return (batch, out[-1]) if self.positions else batch


_LAYER = re.compile(r"blocks\.(\d+)\.")


def _hooked(model) -> bool:
    """Whether any hook point of the model has a forward hook attached (the plain pass would skip it)."""
    points = getattr(model, "hook_dict", None) or {}
    return any(len(getattr(hp, "_forward_hooks", ())) for hp in points.values())


def _masked(x: torch.Tensor, mask: torch.Tensor | None, rows: slice) -> torch.Tensor:
    """x with padded positions zeroed (their values are not used and may differ between passes)."""
    if mask is None:
        return x
    return x * mask[rows].to(x.dtype).unsqueeze(-1)


def for_dictionary(model, config, tokens: torch.Tensor, **kwargs) -> ActivationBuffer:
    """The buffer a dictionary with `config` (a DictionaryConfig) trains on: its hook point, the stack of
    a crosscoder's hook points, or a transcoder's (input, target) pair; ActivationError when its widths
    do not fit the hook points' (naming both)."""
    arch = config.architecture
    if arch == "crosscoder":
        points, target = list(config.hook_points), None
    elif arch in ("transcoder", "skip_transcoder"):
        points, target = config.hook_point, config.out_hook_point
        if not target:
            raise ActivationError(f"a {arch} needs out_hook_point (its target) in its config")
    else:
        points, target = config.hook_point, None
    widths = hook_widths(model, ([points] if isinstance(points, str) else points) + ([target] if target else []))
    for p in ([points] if isinstance(points, str) else points):
        if widths[p] != config.d_in:
            raise ActivationError(f"the dictionary's d_in is {config.d_in} but hook point {p} of "
                                  f"{model.cfg.model_name} has width {widths[p]}")
    d_out = config.d_out or config.d_in
    if target is not None and widths[target] != d_out:
        raise ActivationError(f"the dictionary's d_out is {d_out} but hook point {target} of "
                              f"{model.cfg.model_name} has width {widths[target]}")
    return ActivationBuffer(model, points, tokens, target=target, **kwargs)
