"""A device-leak check that runs on the CPU.

On a CPU-only machine a tensor created on the wrong device cannot fail anything: everything is on the
CPU. What turns into "Expected all tensors to be on the same device" on a GPU is a tensor the library
creates without saying where. `DeviceAudit` is a torch function mode that watches the factory
functions (torch.zeros, ones, empty, full, tensor, arange, ...) and records every call made directly
from mechscope's own source without a `device=` argument. The library's rule (mechscope/devices.py)
is that each such call names its device: the model's or the input's, or HOST where a host-side
tensor is meant. A call that names none would, on a GPU, land on the CPU beside CUDA tensors.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

import mechscope

PACKAGE_DIR = str(Path(mechscope.__file__).resolve().parent)
TORCH_DIR = str(Path(torch.__file__).resolve().parent)

FACTORIES = {
    torch.zeros, torch.ones, torch.empty, torch.full, torch.tensor, torch.arange, torch.eye,
    torch.linspace, torch.rand, torch.randn, torch.randint, torch.randperm, torch.as_tensor,
}


class DeviceAudit(TorchFunctionMode):
    """Records (file, line, function) of mechscope code that creates a tensor with no device."""

    def __init__(self):
        super().__init__()
        self.leaks: list[tuple[str, int, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None and not _keeps_input_device(func, args):
            where = _library_caller()
            if where is not None:
                self.leaks.append(where)
        return func(*args, **kwargs)

    def report(self) -> str:
        lines = sorted(set(self.leaks))
        return "\n".join(f"{Path(f).relative_to(PACKAGE_DIR)}:{n} ({fn})" for f, n, fn in lines)


def _keeps_input_device(func, args) -> bool:
    # torch.as_tensor(t) of a tensor keeps t's device.
    return func is torch.as_tensor and bool(args) and isinstance(args[0], torch.Tensor)


def _library_caller():
    """The first frame outside torch and this module; returned if it is mechscope's own code."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith(TORCH_DIR) and name != __file__:
            if name.startswith(PACKAGE_DIR):
                return name, frame.f_lineno, frame.f_code.co_name
            return None
        frame = frame.f_back
    return None
