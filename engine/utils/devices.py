"""The one check that a device exists on this machine, shared by every command, bench script and the
library API (`selfe.sampling.pipeline_inputs.checked_device`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def unavailable_reason(device: torch.device) -> str | None:
    """Why torch cannot put tensors on `device` here ("this torch has no CUDA device", ...), or None."""
    import torch  # here, not at module level: commands check their arguments before torch loads

    if device.type == "cpu":
        return None
    if device.type == "meta":
        return "holds no data; use cpu or cuda"
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.mps, torch.xpu
    if callable(getattr(backend, "is_available", None)):
        if not backend.is_available():
            return f"this torch has no {device.type.upper()} device"
        count = backend.device_count() if callable(getattr(backend, "device_count", None)) else None
        if device.index is not None and count is not None and device.index >= count:
            return f"this machine has {count} {device.type.upper()} device(s)"
        return None
    try:  # a type without a torch.<type> module: usable only where torch was built for it and it is present
        torch.empty(0, device=device)
    except Exception as err:  # each backend fails in its own way (RuntimeError, AssertionError, ImportError)
        return f"not usable on this machine ({err})"
    return None


def device_problem(device: str) -> str | None:
    """Why `--device DEVICE` ("cuda", "cuda:1", "cpu", ...) cannot run here, or None when it can.

    The reason is a whole sentence that starts with `--device`, ready for `parser.error`."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        return f"--device {device!r} is not a torch device; use cpu, cuda or cuda:N"
    reason = unavailable_reason(parsed)
    return None if reason is None else f"--device {device}: {reason}"
