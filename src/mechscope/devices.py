"""Where tensors live.

The rule the library follows: every tensor it creates takes its device from the model or from the
input it works on (`model_device`). Results that are deliberately kept on the host (edge scores,
circuits, the graph's index tables: small, saved to files, used for bookkeeping) are created with
`device=HOST` said out loud, so a reader can tell a choice from an accident. The test suite checks
this rule on the CPU (tests/devicecheck.py) and runs the core paths on CUDA when one is present.
"""

from __future__ import annotations

import torch

from .errors import MechscopeError

HOST = torch.device("cpu")


class DeviceError(MechscopeError, ValueError):
    """A device that cannot be used here (unknown name, or CUDA asked for where there is none)."""


def default_device() -> torch.device:
    """CUDA when it is available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """A usable torch.device: None means `default_device()`; a CUDA device must exist."""
    if device is None or device == "auto":
        device = default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(f"unknown device '{device}' (use cpu, cuda or cuda:N)") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device '{device}' asked for, but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device '{device}' asked for, but this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
        if dev.index is None:  # name the card, so devices compare equal to where tensors say they are
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def model_device(model) -> torch.device:
    """The device the model's weights are on (its configuration may say otherwise after a move); for
    a model spread over devices by a device_map, the input embedding's (where inputs go)."""
    cfg = getattr(model, "cfg", None)
    if (getattr(cfg, "n_devices", 1) or 1) > 1 and getattr(cfg, "device", None):
        return torch.device(cfg.device)  # the bridge records the embedding's device under a device_map
    for p in model.parameters():
        return p.device
    return torch.device(getattr(cfg, "device", None) or "cpu")


def synchronize(device: torch.device | str) -> None:
    """Wait for queued work on `device` (for timing); a no-op on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def batch_size_for(model, batch_size: int | None = None) -> int:
    """`batch_size`, or the default for where the model runs: 64 examples on a GPU (at 16 a forward
    pass is bound by kernel launches and leaves the GPU idle), 16 on the CPU."""
    if batch_size is not None:
        if batch_size < 1:
            raise DeviceError(f"batch_size must be at least 1, got {batch_size}")
        return int(batch_size)
    return 64 if model_device(model).type == "cuda" else 16
