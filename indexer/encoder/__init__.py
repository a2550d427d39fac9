"""Encoders: text -> unit vectors. One room per concern, so a new backend is one module.

- ``tokenizer``: a model's tokenizer with the encoder's max length (no torch);
- ``batching``: texts in batches by token length within a token budget (no torch);
- ``pooling``: masked mean or ``[CLS]`` pooling of token vectors;
- ``device``: which torch device, and the half precisions it runs;
- ``torch_backend``: ``Encoder``, the model through transformers and torch;
- ``cpu_kernels``: the forward and threads a CPU runs fastest, chosen once and remembered;
- ``cuda_graphs``: queries on CUDA replayed from captured graphs;
- ``base``: ``TokenEncoder``, what the ONNX and traced encoders share (tokenizer, identity);
- ``onnx_backend``: ``OnnxEncoder``, an export of the model run by ONNX Runtime (no torch at run time);
- ``traced_backend``: ``TracedEncoder``, the torch backend for searches: the forward's saved trace, no transformers.

Every backend is an ``EncoderBackend``; ``load`` makes the one settings name (``BACKEND_LOADERS``).
A new backend is a module here and one entry there (and its name in ``settings.BACKENDS``).
Importing this package imports no torch: the torch backend's names load it when first used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from ..models import canonical_model_name, resolve_model_path
from .batching import QUERY_TEXTS, BatchBudget, flatten, length_batches
from .tokenizer import CUT_CHARS_PER_TOKEN, TextTokenizer, model_max_length

if TYPE_CHECKING:
    from ..settings import Embedding, IndexSettings


@runtime_checkable
class EncoderBackend(Protocol):
    """What writes, searches, ``embed`` and Ray replicas need of an encoder."""

    model_name: str
    backend: str
    pooling: str
    precision: str
    max_length: int | None
    dimension: int

    @property
    def fingerprint(self) -> str: ...  # SHA-256 of the weights and tokenizer (writes only: it may hash the weights)

    @property
    def embedding(self) -> Embedding: ...

    def embeds_as(self, settings: IndexSettings) -> bool: ...

    def tokenize(self, texts: Sequence[str]) -> list: ...

    def embed_tokens(self, token_ids: list, progress: bool = False) -> np.ndarray: ...

    def encode_texts(self, texts: Sequence[str], progress: bool = False) -> np.ndarray: ...

    def encode_queries(self, queries: Sequence[str]) -> np.ndarray: ...


def _torch(settings: IndexSettings, device: str | None, tokenizer: TextTokenizer | None) -> EncoderBackend:
    from .torch_backend import Encoder

    return Encoder.from_settings(settings, device, tokenizer=tokenizer)


def _onnx(settings: IndexSettings, device: str | None, tokenizer: TextTokenizer | None) -> EncoderBackend:
    from .onnx_backend import from_settings

    return from_settings(settings, device)


# Backend name (``IndexSettings.backend``) -> what loads it from settings, a device and a tokenizer loaded already.
BACKEND_LOADERS: dict[str, Callable[[IndexSettings, str | None, TextTokenizer | None], EncoderBackend]] = {
    "torch": _torch,
    "onnx": _onnx,
}


def load(settings: IndexSettings, device: str | None = None, *, tokenizer: TextTokenizer | None = None) -> EncoderBackend:
    """A new encoder of our model as ``settings`` describe, from the backend they name."""
    return BACKEND_LOADERS[settings.backend](settings, device, tokenizer)


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

__all__ = ["BACKEND_LOADERS", "CUT_CHARS_PER_TOKEN", "QUERY_TEXTS", "BatchBudget", "EncoderBackend", "TextTokenizer",
           "canonical_model_name", "flatten", "length_batches", "load", "model_max_length", "resolve_model_path",
           *_TORCH_NAMES]


def __getattr__(name: str) -> Any:
    module = _TORCH_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
