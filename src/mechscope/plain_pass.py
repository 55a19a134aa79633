"""Residual-stream activations from a plain transformers pass over the bridge's own weights.

A `TransformerBridge` reimplements attention step by step so that every intermediate (scores, pattern,
rotated queries and keys) is a hook point. Reading only the residual stream, as dictionary training
does on most hook points, pays for that without using it: on SmolLM2-135M (CPU, 8 x 128 tokens, up to
layer 15) the bridge's pass takes about 1.5x as long as transformers' own modules with PyTorch's fused
scaled-dot-product attention.

`plain_model(bridge)` is a second view of the same model: the transformers module tree the bridge
wraps, with every bridge component replaced by the module it wraps. It shares the bridge's parameter
tensors (no copy, no extra memory beyond the module objects), so weights processed by the bridge
(folded norms) are the ones it runs, and it uses SDPA attention through its own copy of the config.
`read_residual(bridge, tokens, points, attention_mask)` runs it up to the last requested
`blocks.L.hook_resid_pre` / `blocks.L.hook_resid_post` and returns them as the bridge's hooks would.

Whether the view computes what the bridge computes depends on the architecture and on how the bridge
processed it, so it is never trusted blindly. It is refused unless it runs on exactly the bridge's
parameter tensors (GPT-2's bridge splits the fused attention weight into copies of its own, so GPT-2
always takes the bridge's pass), and `agrees(...)` compares it with the bridge's own pass on real
input: callers (ActivationBuffer) check once before relying on it and fall back to the bridge when the
two differ or when the view cannot be used.
"""

from __future__ import annotations

import copy
import re
import weakref
from typing import Sequence

import torch
from torch import nn

_RESID = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")
_VIEWS: "weakref.WeakKeyDictionary[nn.Module, _PlainView | None]" = weakref.WeakKeyDictionary()


class _Stop(Exception):
    """Raised by the last hook read to end the pass early."""


class _PlainView:
    def __init__(self, root: nn.Module, blocks: list[nn.Module]):
        self.root, self.blocks = root, blocks


def residual_points(points: Sequence[str]) -> list[tuple[int, str]] | None:
    """[(layer, 'pre'|'post')] when every point is a residual-stream hook point, else None."""
    out = []
    for p in points:
        m = _RESID.match(p)
        if m is None:
            return None
        out.append((int(m.group(1)), m.group(2)))
    return out


def _is_bridge_component(module: nn.Module) -> bool:
    return "_original_component" in module._modules or hasattr(type(module), "original_component")


def _unwrap(module: nn.Module, config, clones: dict[int, nn.Module]) -> nn.Module:
    """A shallow copy of `module` with its bridge components replaced by what they wrap (recursively),
    sharing parameters and buffers; `clones` maps id(original) -> copy."""
    while _is_bridge_component(module):
        inner = module._modules.get("_original_component")
        if inner is None:
            raise LookupError(f"{type(module).__name__} wraps no module")
        module = inner
    if id(module) in clones:
        return clones[id(module)]
    clone = copy.copy(module)
    clones[id(module)] = clone
    clone.__dict__["_parameters"] = dict(module._parameters)
    clone.__dict__["_buffers"] = dict(module._buffers)
    for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_forward_hooks_with_kwargs",
                 "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks"):
        if name in module.__dict__:
            clone.__dict__[name] = type(module.__dict__[name])()
    clone.__dict__["_modules"] = {k: None if c is None else _unwrap(c, config, clones)
                                  for k, c in module._modules.items()}
    if getattr(module, "config", None) is not None and config is not None and \
            type(module.config).__name__ == type(config).__name__:
        clone.__dict__["config"] = config
    return clone


def plain_model(bridge) -> _PlainView | None:
    """The plain transformers view of `bridge` (cached per bridge), or None where it cannot be built
    (a HookedRootModule, a bridge without `original_model`, or a module it cannot unwrap)."""
    if bridge in _VIEWS:
        return _VIEWS[bridge]
    view = None
    try:
        original = bridge.__dict__.get("original_model") or getattr(bridge, "original_model", None)
        blocks = getattr(bridge, "blocks", None)
        if original is not None and blocks is not None:
            config = copy.copy(getattr(original, "config", None))
            if config is not None:
                config._attn_implementation = "sdpa"
            clones: dict[int, nn.Module] = {}
            root = _unwrap(original, config, clones)
            layers = []
            for block in blocks:
                inner = block._modules.get("_original_component")
                if inner is None or id(inner) not in clones:
                    raise LookupError("a block is not part of the wrapped model")
                layers.append(clones[id(inner)])
            root.eval()
            view = _PlainView(root, layers)
    except (LookupError, AttributeError, TypeError, ValueError):
        view = None
    _VIEWS[bridge] = view
    return view


def _same_parameters(bridge, view: _PlainView) -> bool:
    """Whether the view runs on exactly the bridge's parameter tensors. Not so where the bridge keeps
    weights of its own (GPT-2's fused c_attn, which the bridge splits into separate q, k and v weights:
    an edit to those would not reach the view), or where a parameter was replaced after the view was built."""
    return {p.data_ptr() for p in bridge.parameters()} == {p.data_ptr() for p in view.root.parameters()}


def read_residual(bridge, tokens: torch.Tensor, points: Sequence[str],
                  attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """{point: [batch, pos, d_model]} for residual-stream hook points, from the plain view's pass,
    which stops after the last layer needed. Raises LookupError where the view cannot serve them."""
    wanted = residual_points(points)
    view = plain_model(bridge)
    if wanted is None or view is None:
        raise LookupError("the plain pass reads only blocks.L.hook_resid_pre / hook_resid_post of a bridge")
    if not _same_parameters(bridge, view):
        raise LookupError("the bridge computes with parameters the plain view does not hold")
    got: dict[str, torch.Tensor] = {}
    handles = []
    needed = len(set(points))

    def keep(point: str, value: torch.Tensor) -> None:
        got[point] = value.detach()
        if len(got) == needed:  # the last point read: the rest of the pass is not needed
            raise _Stop

    def before(point: str):
        return lambda module, args, kwargs: keep(point, kwargs.get("hidden_states", args[0] if args else None))

    def after(point: str):
        return lambda module, args, kwargs, output: keep(point, output[0] if isinstance(output, tuple) else output)

    try:
        for point, (layer, where) in zip(points, wanted):
            block = view.blocks[layer]
            if where == "pre":
                handles.append(block.register_forward_pre_hook(before(point), with_kwargs=True))
            else:
                handles.append(block.register_forward_hook(after(point), with_kwargs=True))
        kwargs = {"use_cache": False}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask.long()
        with torch.inference_mode():
            view.root(tokens, **kwargs)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [p for p in points if p not in got]
    if missing:
        raise LookupError(f"{missing[0]} did not run in the plain pass")
    return {p: got[p].clone() for p in points}


def agrees(reference: torch.Tensor, fast: torch.Tensor, rtol: float = 1e-4) -> bool:
    """Whether two [batch, pos, d] readings agree position by position: the largest difference in each
    row at most `rtol` of that row's largest magnitude (plus a float32 floor)."""
    if reference.shape != fast.shape:
        return False
    diff = (reference.float() - fast.float()).abs().amax(-1)
    scale = reference.float().abs().amax(-1)
    return bool((diff <= rtol * scale + 1e-6).all())
