"""Steering vectors: a direction in the activation space of one hook point, where it came from, and
which model it belongs to.

Four sources:
  * `actadd` (Turner et al. 2023): the activation difference of ONE prompt pair, at the last token,
    or at every position when the two prompts have the same number of tokens ("aligned": a
    [n_positions, d_model] vector, added at the first n positions of a prompt);
  * `caa` (Rimsky et al. 2024): the mean, over many contrast pairs, of the activation difference at
    the answer (last) position, read with `probes.activations.collect` in one pass per batch;
  * `from_direction`: any direction found elsewhere (a probe's weight vector, a CCS direction);
  * `from_decoder_row`: a dictionary latent's decoder row (a sparse autoencoder or transcoder's
    W_dec[i]); ready for when dictionaries are trained in mechscope.

A vector is saved as one safetensors file whose metadata holds the rest as JSON (hook point,
method, the model's fingerprint, provenance), written atomically. Loading it with a model other than
the one it was made on is refused, naming the file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..devices import HOST
from ..errors import MechscopeError

FORMAT = 1
_META_KEY = "mechscope_steering"


class SteeringError(MechscopeError, ValueError):
    """A steering vector or direction that cannot be used: unknown hook point, wrong size, another
    model's file, an unreadable file, empty or unequal pair lists."""


def _hook_width(model, hook_point: str) -> int:
    """The last dimension of the activations at `hook_point` (d_model for residual-stream writes)."""
    from ..probes.activations import ActivationError, check_hook_points

    try:
        check_hook_points(model, [hook_point])
    except ActivationError as exc:
        raise SteeringError(str(exc)) from None
    return int(model.cfg.d_model)


def check_vector(model, hook_point: str, vector: torch.Tensor, what: str = "direction") -> torch.Tensor:
    """`vector` ([d_model] or [n_positions, d_model]) as float32 on the host, checked against the
    model: SteeringError for an unknown hook point, a wrong size, or NaN / infinite entries."""
    width = _hook_width(model, hook_point)
    if not isinstance(vector, torch.Tensor):
        vector = torch.as_tensor(vector, dtype=torch.float32, device=HOST)
    if vector.dim() not in (1, 2) or vector.shape[-1] != width or vector.numel() == 0:
        raise SteeringError(f"the {what} has shape {tuple(vector.shape)}, but {hook_point} of "
                            f"{model.cfg.model_name} needs [{width}] (or [n_positions, {width}])")
    if not bool(vector.isfinite().all()):
        raise SteeringError(f"the {what} has NaN or infinite entries")
    return vector.detach().to(HOST, torch.float32).contiguous()


@dataclass
class SteeringVector:
    """A direction at `hook_point`: `vector` is [d_model] (added at the positions asked for) or
    [n, d_model] (added at the first n positions, ActAdd's aligned form). `model` is the fingerprint
    of the model it was made on (`lens.text.model_fingerprint`); `provenance` says how."""

    hook_point: str
    vector: torch.Tensor
    method: str
    model: str
    provenance: dict = field(default_factory=dict)

    @property
    def d_model(self) -> int:
        return int(self.vector.shape[-1])

    @property
    def layer(self) -> int | None:
        parts = self.hook_point.split(".")
        return int(parts[1]) if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit() else None

    def unit(self) -> "SteeringVector":
        """The same direction scaled to norm 1 (each row for an aligned vector)."""
        norm = self.vector.norm(dim=-1, keepdim=True)
        if bool((norm == 0).any()):
            raise SteeringError("cannot normalise a zero steering vector")
        return SteeringVector(self.hook_point, self.vector / norm, self.method, self.model,
                              {**self.provenance, "normalised": True})

    def save(self, path: str | os.PathLike) -> Path:
        """Write the vector and its description to `path` (a .safetensors file), atomically."""
        from safetensors.torch import save_file

        from ..fileio import atomic_path

        path = Path(path)
        meta = {"format": FORMAT, "hook_point": self.hook_point, "method": self.method, "model": self.model,
                "d_model": self.d_model, "provenance": self.provenance}
        with atomic_path(path) as tmp:
            save_file({"vector": self.vector.detach().to(HOST, torch.float32).contiguous()}, str(tmp),
                      metadata={_META_KEY: json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model=None) -> "SteeringVector":
        """Read a saved vector. With `model`, refuse (SteeringError naming `path`) a vector made on
        another model, one of another size, or one at a hook point the model does not have."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise SteeringError(f"{path}: no such steering vector file")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = json.loads((f.metadata() or {})[_META_KEY])
                vector = f.get_tensor("vector")
        except Exception as exc:  # a damaged file, another safetensors file, bad JSON
            raise SteeringError(f"{path}: not a mechscope steering vector ({type(exc).__name__}: {exc})") from None
        for key in ("hook_point", "method", "model"):
            if not isinstance(meta.get(key), str):
                raise SteeringError(f"{path}: field {key!r} missing from the vector's metadata")
        vec = cls(meta["hook_point"], vector.to(torch.float32), meta["method"], meta["model"],
                  dict(meta.get("provenance") or {}))
        if model is not None:
            from ..lens.text import model_fingerprint

            if vec.d_model != model.cfg.d_model:
                raise SteeringError(f"{path}: the vector has size {vec.d_model}, but {model.cfg.model_name} has "
                                    f"d_model {model.cfg.d_model}")
            if meta["model"] != model_fingerprint(model):
                made_on = vec.provenance.get("model_name", "another model")
                raise SteeringError(f"{path}: made on {made_on} (fingerprint {meta['model']}), not on "
                                    f"{model.cfg.model_name} (fingerprint {model_fingerprint(model)})")
            try:
                check_vector(model, vec.hook_point, vec.vector, "saved vector")
            except SteeringError as exc:
                raise SteeringError(f"{path}: {exc}") from None
        return vec


def _make(model, hook_point: str, vector: torch.Tensor, method: str, provenance: dict) -> SteeringVector:
    from ..lens.text import model_fingerprint

    vector = check_vector(model, hook_point, vector)
    name = getattr(model, "mechscope_name", None) or model.cfg.model_name
    return SteeringVector(hook_point, vector, method, model_fingerprint(model),
                          {"model_name": str(name), **provenance})


def _check_pairs(positives: Sequence[str], negatives: Sequence[str]) -> None:
    if isinstance(positives, str) or isinstance(negatives, str):
        raise SteeringError("give the positive and negative texts as lists of strings")
    if not positives or not negatives:
        raise SteeringError("no contrast pairs given: the positive and negative lists must not be empty")
    if len(positives) != len(negatives):
        raise SteeringError(f"{len(positives)} positive texts but {len(negatives)} negative ones: "
                            "contrast pairs need one of each")


def caa_many(model, positives: Sequence[str], negatives: Sequence[str], hook_points: Sequence[str],
             position: int | str = "last", batch_size: int | None = None,
             progress: bool = False) -> dict[str, SteeringVector]:
    """{hook point: CAA vector}: mean over pairs of (activation of positives[i] - of negatives[i]) at
    `position` ("last": the answer token), every hook point read in the same forward passes."""
    from ..probes.activations import ActivationError, collect

    _check_pairs(positives, negatives)
    points = [hook_points] if isinstance(hook_points, str) else list(hook_points)
    for p in points:
        _hook_width(model, p)
    try:
        acts = collect(model, list(positives) + list(negatives), points, position=position,
                       batch_size=batch_size, progress=progress)
    except ActivationError as exc:
        raise SteeringError(str(exc)) from None
    n = len(positives)
    out = {}
    for p in points:
        diff = acts[p][:n] - acts[p][n:]
        if diff.dim() != 2:
            raise SteeringError(f"{p}: activations of shape {tuple(diff.shape[1:])} per text; CAA needs a "
                                "residual-stream hook point ([d_model] per position)")
        out[p] = _make(model, p, diff.mean(0), "caa",
                       {"pairs": n, "position": position, "diff_norm_mean": float(diff.norm(dim=1).mean())})
    return out


def caa(model, positives: Sequence[str], negatives: Sequence[str], hook_point: str,
        position: int | str = "last", batch_size: int | None = None) -> SteeringVector:
    """The CAA vector at one hook point (see `caa_many`)."""
    return caa_many(model, positives, negatives, [hook_point], position, batch_size)[hook_point]


def actadd(model, positive: str, negative: str, hook_point: str, aligned: bool = False) -> SteeringVector:
    """ActAdd: activation(positive) - activation(negative) at `hook_point`, at the last token, or
    (`aligned`) at every position of two prompts of equal token length: a [n_positions, d_model]
    vector that `apply` adds at the first n positions (BOS included)."""
    from ..probes.activations import collect, tokenize_texts

    _check_pairs([positive], [negative])
    if not aligned:
        vec = caa_many(model, [positive], [negative], [hook_point])[hook_point]
        vec.method = "actadd"
        vec.provenance.update(positive=positive, negative=negative, aligned=False)
        return vec
    ids = tokenize_texts(model.tokenizer, [positive, negative])
    if len(ids[0]) != len(ids[1]):
        raise SteeringError(f"aligned ActAdd needs prompts of equal token length: {positive!r} has "
                            f"{len(ids[0])} tokens, {negative!r} has {len(ids[1])}; pad one, or use the last token")
    _hook_width(model, hook_point)
    rows = [collect(model, [positive, negative], [hook_point], position=i, progress=False)[hook_point]
            for i in range(len(ids[0]))]
    diff = torch.stack([r[0] - r[1] for r in rows])
    return _make(model, hook_point, diff, "actadd", {"positive": positive, "negative": negative, "aligned": True})


def from_direction(model, direction: torch.Tensor, hook_point: str, method: str = "probe",
                   provenance: dict | None = None) -> SteeringVector:
    """A steering vector from a direction found elsewhere (a linear probe's weights, a CCS direction)."""
    return _make(model, hook_point, direction, method, dict(provenance or {}))


def from_decoder_row(model, decoder: torch.Tensor, hook_point: str, index: int | None = None,
                     provenance: dict | None = None) -> SteeringVector:
    """A dictionary latent's decoder row as a steering vector: `decoder` is the row ([d_model]), or
    the decoder matrix W_dec [n_latents, d_model] with `index` the latent."""
    if index is not None:
        if decoder.dim() != 2 or not 0 <= index < decoder.shape[0]:
            raise SteeringError(f"latent {index} is not a row of a decoder of shape {tuple(decoder.shape)}")
        decoder = decoder[index]
    return _make(model, hook_point, decoder, "dictionary", {"latent": index, **dict(provenance or {})})
