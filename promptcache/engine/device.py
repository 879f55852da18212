"""Device names: ``cpu`` or ``cuda[:n]``."""

from __future__ import annotations

import torch


def resolve_device(device: str) -> torch.device:
    """``cpu`` or ``cuda[:n]``; a clear error when CUDA is asked for but absent."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available on this host")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r} (use 'cpu' or 'cuda')")
    if dev.type == "cuda" and dev.index is None:
        # Tensors report an index; copies and pools are keyed by it.
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


__all__ = ["resolve_device"]
