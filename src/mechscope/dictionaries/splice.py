"""Splicing dictionaries into a model's forward pass (method.md §11).

`splice(model, saes, keep_error=True)` is a context manager: while it is open, every forward pass of
`model` runs each dictionary at its hook point(s):

  * an SAE at hook point H: the activation x at H is replaced by x̂ + e, with x̂ = decode(encode(x))
    and e = x − x̂ the error term;
  * a transcoder (input hook point I, target T, e.g. `blocks.L.ln2.hook_out` -> `blocks.L.hook_mlp_out`):
    the activation y at T is replaced by ŷ + e with ŷ the transcoder's output from the activation at I
    in the same pass, and e = y − ŷ.

Latents and error are nodes of their own: they pass through hook points named
`<H>.sae.hook_latents` [..., d_sae] and `<H>.sae.hook_error` [..., d] (H the hook point written: the
target's for a transcoder), plus `<H>.sae.hook_recons` (x̂ before the error is added). A hook on them
can read, patch or take gradients with respect to them.
With gradients on, the latent node is a copy of the encoder's output and the error is computed from
the encoder's output itself, so the gradient at `hook_latents` is the partial one, W_dec·∂m/∂x̂ (not
cancelled by the error's own dependence on the latents), the gradient at `hook_error` is ∂m/∂x̂, and
upstream gradients are the original model's; a hook that edits the latents changes x̂ and leaves the
error at its value for the unedited latents.
The names are registered on the model while the splice is open, so `model.hooks(fwd_hooks=[...])` and
`model.run_with_cache` reach them; `Splice.hook_dict` holds them too.

With `keep_error=True` the spliced model computes the original function (up to float rounding, the
identity the tests check). With `keep_error=False` the activation is x̂ alone, except at positions
holding the BOS token (the first position of the sequences mechscope builds), which keep their own
activation: dictionaries are trained with BOS skipped (its activation is an outlier they never saw), so
replacing it would measure something they were not trained for. Which positions hold BOS comes from
`Splice.set_tokens(tokens)`; until it is called, the first position is taken as the BOS position.

Crosscoders read several layers at once; an acausal crosscoder's reconstruction of an early layer
needs later layers' activations, which a single forward pass has not computed yet, so a crosscoder is
refused here (measure one on stored activations with `evaluate`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from .dictionary import Dictionary, DictionaryError

LATENTS, ERROR, RECONS = "sae.hook_latents", "sae.hook_error", "sae.hook_recons"


class _Site(nn.Module):
    """One dictionary spliced in: its hook points for latents, reconstruction and error."""

    def __init__(self, sae: Dictionary, keep_error: bool):
        super().__init__()
        c = sae.config
        if c.architecture == "crosscoder":
            raise DictionaryError("a crosscoder cannot be spliced into one forward pass (its reconstruction of "
                                  "an early layer needs later layers); measure it with evaluate() on activations")
        self.sae = sae
        self.keep_error = keep_error
        self.reads = c.hook_point
        self.writes = c.out_hook_point if c.is_transcoder else c.hook_point
        self.hook_latents, self.hook_recons, self.hook_error = HookPoint(), HookPoint(), HookPoint()
        for point, suffix in ((self.hook_latents, LATENTS), (self.hook_recons, RECONS), (self.hook_error, ERROR)):
            point.name = f"{self.writes}.{suffix}"
        self.source: Tensor | None = None  # a transcoder's input activation, read earlier in the same pass

    def names(self) -> dict[str, HookPoint]:
        return {p.name: p for p in (self.hook_latents, self.hook_recons, self.hook_error)}

    def read_hook(self, act: Tensor, hook) -> Tensor:
        self.source = act
        return act

    def _decode(self, f: Tensor, x: Tensor) -> Tensor:
        out = self.sae.decode(f)
        skip = self.sae.skip(x)
        return out if skip is None else out + skip

    def replace(self, act: Tensor, untouched: Tensor | None) -> Tensor:
        """The activation written at the hook point: x̂ + e (keep_error) or x̂ (BOS positions unchanged)."""
        sae = self.sae
        if sae.config.is_transcoder:
            if self.source is None:
                raise DictionaryError(f"the transcoder's input {self.reads} did not run before {self.writes}")
            x, self.source = self.source, None
        else:
            x = act
        shape = act.shape
        x = x.reshape(*x.shape[:2], -1)  # hook_z: [batch, pos, heads, d_head] -> [batch, pos, heads * d_head]
        y = act.reshape(*shape[:2], -1)
        grad = torch.is_grad_enabled()
        encoded = sae.encode(x)
        # The latent node is a copy when gradients are on, so that its gradient is the partial one
        # (through the reconstruction only), not cancelled by the error's dependence on the same latents.
        f = self.hook_latents(encoded.clone() if grad else encoded)
        recons = self.hook_recons(self._decode(f, x).to(act.dtype))
        if recons.shape != y.shape:
            raise DictionaryError(f"the dictionary writes width {recons.shape[-1]} at {self.writes}, whose "
                                  f"activation has width {y.shape[-1]}")
        if self.keep_error:
            # e = y − x̂ of the unpatched latents: a hook that edits the latents changes x̂ alone.
            base = recons if (f is encoded and not grad) else self._decode(encoded, x).to(act.dtype)
            out = recons + self.hook_error(y - base)
        else:
            out = recons
            if untouched is not None:
                keep = untouched.to(out.device)[..., None]
                out = torch.where(keep, y, out)
        return out.reshape(shape)


class Splice:
    """The open splice: `hook_dict` {name: HookPoint} of every spliced dictionary's latents, reconstruction
    and error; `set_tokens(tokens)` names the BOS positions of the next forward pass."""

    def __init__(self, model, saes: Sequence[Dictionary], keep_error: bool):
        self.model = model
        self.keep_error = keep_error
        self.sites = [_Site(s, keep_error) for s in saes]
        written = [s.writes for s in self.sites]
        if len(set(written)) != len(written):
            raise DictionaryError(f"two dictionaries write the same hook point: {', '.join(written)}")
        self.hook_dict: dict[str, HookPoint] = {}
        for site in self.sites:
            self.hook_dict.update(site.names())
        self.untouched: Tensor | None = None
        self._bos = _bos_token(model)

    def set_tokens(self, tokens: Tensor | None) -> None:
        """The token ids [batch, pos] of the next forward pass; positions holding BOS keep their activation
        (keep_error=False). None: the first position is treated as BOS."""
        self.untouched = None if tokens is None or self._bos is None else tokens == self._bos

    def _mask(self, act: Tensor) -> Tensor:
        if self.untouched is not None and tuple(self.untouched.shape) == tuple(act.shape[:2]):
            return self.untouched
        mask = torch.zeros(act.shape[:2], dtype=torch.bool, device=act.device)
        mask[:, 0] = True
        return mask

    def hooks(self) -> list[tuple[str, object]]:
        """(hook point, function) pairs for model.hooks: read a transcoder's input, write each site."""
        pairs = []
        for site in self.sites:
            if site.sae.config.is_transcoder:
                pairs.append((site.reads, site.read_hook))
            pairs.append((site.writes, self._writer(site)))
        return pairs

    def _writer(self, site: _Site):
        def write(act, hook):
            return site.replace(act, None if self.keep_error else self._mask(act))
        return write


def _bos_token(model) -> int | None:
    tokenizer = getattr(model, "tokenizer", None)
    return getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None


def _as_list(saes) -> list[Dictionary]:
    items = [saes] if isinstance(saes, Dictionary) else list(saes)
    if not items:
        raise DictionaryError("no dictionary to splice")
    for s in items:
        if not isinstance(s, Dictionary):
            raise DictionaryError(f"expected a Dictionary to splice, got {type(s).__name__}")
    return items


def _register(model, names: dict[str, HookPoint]) -> list:
    """Make the splice's hook points visible to model.hooks / run_with_cache; returns what to undo."""
    undo = []
    registry = getattr(model, "_hook_registry", None)
    if isinstance(registry, dict):  # TransformerBridge
        for name, point in names.items():
            registry[name] = point
            undo.append((registry, name))
        return undo
    for attr in ("hook_dict", "mod_dict"):  # HookedRootModule
        table = getattr(model, attr, None)
        if isinstance(table, dict):
            for name, point in names.items():
                table[name] = point
                undo.append((table, name))
    return undo


@contextmanager
def splice(model, saes: Dictionary | Iterable[Dictionary], keep_error: bool = True, check: bool = True):
    """Splice `saes` (one Dictionary or several, each at its own hook point) into `model` while open;
    yields the `Splice` (see the module's docstring). `check` first compares each dictionary's widths
    with the model's (DictionaryError naming the hook point; an unknown one lists valid names)."""
    from .activations import _enable

    items = _as_list(saes)
    state = Splice(model, items, keep_error)
    if check:
        for sae in items:
            sae.check_model(model)
    points = [p for site in state.sites for p in (site.reads, site.writes)]
    _enable(model, points)
    from ..devices import model_device

    where = model_device(model)
    for sae in items:
        if sae.device != where:
            raise DictionaryError(f"the dictionary of {sae.config.hook_point} is on {sae.device}, the model on "
                                  f"{where}: move it with .to({str(where)!r})")
    undo = _register(model, state.hook_dict)
    try:
        with model.hooks(fwd_hooks=state.hooks()):
            yield state
    finally:
        for table, name in undo:
            table.pop(name, None)
        for site in state.sites:
            site.source = None
        for point in state.hook_dict.values():
            point.remove_hooks("both", including_permanent=True)
