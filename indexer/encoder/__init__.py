"""Encoders: text -> unit vectors. One room per concern, so a new backend is one module.

- ``tokenizer``: a model's tokenizer with the encoder's max length (no torch);
- ``batching``: texts in batches by token length within a token budget (no torch);
- ``pooling``: masked mean or ``[CLS]`` pooling of token vectors;
- ``device``: which torch device, and the half precisions it runs;
- ``torch_backend``: ``Encoder``, the model through transformers and torch;
- ``cpu_kernels``: the forward and threads a CPU runs fastest, chosen once and remembered;
- ``cuda_graphs``: queries on CUDA replayed from captured graphs.

Importing this package imports no torch: the torch backend's names load it when first used.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..models import canonical_model_name, resolve_model_path
from .batching import QUERY_TEXTS, BatchBudget, flatten, length_batches
from .tokenizer import CUT_CHARS_PER_TOKEN, TextTokenizer, model_max_length

# Names of the torch backend, imported (with torch) on first use.
_TORCH_NAMES = {
    "Encoder": "torch_backend",
    "CPU_BATCH_TOKENS": "torch_backend",
    "CPU_BATCH_TOKENS_MAX": "torch_backend",
    "GPU_BATCH_TOKENS": "torch_backend",
    "GPU_BATCH_TOKENS_MAX": "torch_backend",
    "choose_device": "device",
    "mean_pool": "pooling",
    "cls_pool": "pooling",
    "POOLERS": "pooling",
    "times_forwards": "cpu_kernels",
}

__all__ = ["CUT_CHARS_PER_TOKEN", "QUERY_TEXTS", "BatchBudget", "TextTokenizer", "canonical_model_name", "flatten",
           "length_batches", "model_max_length", "resolve_model_path", *_TORCH_NAMES]


def __getattr__(name: str) -> Any:
    module = _TORCH_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
