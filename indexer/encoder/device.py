"""Which torch device an encoder runs on, and the half precisions a device runs."""

from __future__ import annotations

import torch

from ..errors import ArgumentError

HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def choose_device(device: str | None = None) -> torch.device:
    """``device`` if given (ArgumentError if this machine has no such device), else cuda, then mps, then cpu."""
    if device:
        try:
            chosen = torch.device(device)
        except RuntimeError:
            raise ArgumentError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
        # Said now, in one line: torch says it as an AssertionError or RuntimeError at the first tensor moved there.
        # (ROCm builds call their GPUs cuda too; device_count is 0 on a CPU-only build.)
        if chosen.type == "cuda" and (chosen.index or 0) >= (count := torch.cuda.device_count()):
            if torch.version.cuda is None and torch.version.hip is None:
                raise ArgumentError(f"device {device!r}: this torch was built without CUDA")
            raise ArgumentError(f"device {device!r}: {count} CUDA device{'' if count == 1 else 's'} visible here "
                                "(see CUDA_VISIBLE_DEVICES and the driver)")
        if chosen.type == "mps" and not torch.backends.mps.is_available():
            raise ArgumentError(f"device {device!r}: MPS is not available on this machine")
        return chosen
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
