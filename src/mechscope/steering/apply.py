"""Adding α·v at a hook point during a forward pass and during generation.

`steered(model, vector, alpha, positions)` is a context manager: inside it, every forward pass of
`model` has α·v added to the activation at the vector's hook point, at every position (positions=None)
or at the token indices given (BOS is index 0; a negative index counts from the end of the sequence
as passed, padding included). An aligned ActAdd vector [n, d_model] is added row by row at positions
0 .. n-1. α = 0 adds an exact zero, so the outputs are bit-for-bit those of the plain model.

`generate` continues a prompt greedily or by sampling from a seeded generator, with or without
steering. It keeps no key-value cache: each new token is read from a full forward pass over the
prompt and the tokens so far, so the steering at chosen positions means the same at every step and
the continuation is, by construction, the step-by-step recomputation. Continuations are short
(tens of tokens), where the quadratic cost is small.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from ..devices import HOST, model_device
from ..errors import check_count
from .vectors import SteeringError, SteeringVector, check_vector


def _check_positions(positions) -> list[int] | None:
    if positions is None:
        return None
    if isinstance(positions, int):
        positions = [positions]
    out = []
    for p in positions:
        if isinstance(p, bool) or not isinstance(p, int):
            raise SteeringError(f"positions must be token indices (ints), got {p!r}")
        out.append(p)
    if not out:
        raise SteeringError("positions is empty: give None (every position) or at least one index")
    return out


def steering_hook(model, vector: SteeringVector, alpha: float, positions: Sequence[int] | None = None):
    """(hook point, hook function) adding alpha * vector there (see the module docstring)."""
    vec = check_vector(model, vector.hook_point, vector.vector, "steering vector")
    alpha = float(alpha)
    if alpha != alpha or alpha in (float("inf"), float("-inf")):
        raise SteeringError(f"alpha must be a finite number, got {alpha}")
    positions = _check_positions(positions)
    if vec.dim() == 2 and positions is not None:
        raise SteeringError("an aligned (per-position) vector is added at its own positions; do not give positions")
    cached: dict = {}

    def add(act, hook):
        key = (act.device, act.dtype)
        if key not in cached:
            cached[key] = (alpha * vec).to(act.device, act.dtype)
        delta = cached[key]
        n_pos = act.shape[1]
        if delta.dim() == 2:
            n = min(n_pos, delta.shape[0])
            act = act.clone()
            act[:, :n] = act[:, :n] + delta[:n]
            return act
        if positions is None:
            return act + delta
        act = act.clone()
        for p in positions:
            if -n_pos <= p < n_pos:  # a position beyond this sequence is not there to steer
                act[:, p] = act[:, p] + delta
        return act

    return vector.hook_point, add


@contextmanager
def steered(model, vector: SteeringVector | None, alpha: float = 1.0,
            positions: Sequence[int] | None = None) -> Iterator[None]:
    """Every forward pass of `model` inside the block is steered by alpha * vector (None: not steered)."""
    if vector is None:
        yield
        return
    with model.hooks(fwd_hooks=[steering_hook(model, vector, alpha, positions)]):
        yield


@torch.no_grad()
def generate(model, prompt: str, max_new_tokens: int = 20, vector: SteeringVector | None = None,
             alpha: float = 0.0, positions: Sequence[int] | None = None, do_sample: bool = False,
             seed: int = 0, temperature: float = 1.0, stop_at_eos: bool = True) -> list[int]:
    """The ids of up to `max_new_tokens` tokens continuing `prompt` (BOS put in front), greedy or
    sampled (`do_sample`, at `temperature`, from a torch.Generator seeded with `seed`), under
    `steered(model, vector, alpha, positions)`."""
    from ..probes.activations import tokenize_texts

    check_count("max_new_tokens", max_new_tokens)
    if do_sample and not temperature > 0:
        raise SteeringError(f"temperature must be > 0, got {temperature}")
    device = model_device(model)
    ids = torch.tensor(tokenize_texts(model.tokenizer, [prompt]), dtype=torch.long, device=device)
    gen = torch.Generator(device=HOST).manual_seed(int(seed))
    eos = model.tokenizer.eos_token_id
    out: list[int] = []
    with steered(model, vector, alpha, positions):
        for _ in range(max_new_tokens):
            logits = model(ids)[0, -1].float()
            if do_sample:
                probs = torch.softmax(logits / temperature, dim=-1).to(HOST)
                nxt = int(torch.multinomial(probs, 1, generator=gen))
            else:
                nxt = int(logits.argmax())
            out.append(nxt)
            if stop_at_eos and eos is not None and nxt == eos:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]], dtype=torch.long, device=device)], dim=1)
    return out


def continuation(model, prompt: str, **kwargs) -> str:
    """`generate`'s tokens decoded to text."""
    return model.tokenizer.decode(generate(model, prompt, **kwargs))
