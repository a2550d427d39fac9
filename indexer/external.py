"""Which encoder a write or a search uses: ours (``encoder.Encoder``), or someone else's embedding functions.

An index records its encoder in ``settings.model``: a model name or folder
for ours, ``external:NAME`` for an ``ExternalEncoder`` (for instance a
LangChain ``Embeddings`` object, see ``integrations.langchain``). An external
index can only be written and searched with that encoder passed in; our own
model (and torch) is then never loaded. A write gets ours as a
``DeferredEncoder`` where it can: loaded only if a text must be encoded.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import collector
from .errors import ModelError
from .models import ModelFacts, canonical_model_name, embeds_as, read_memo, remembered_facts, write_memo
from .settings import EXTERNAL_POOLING, Embedding, IndexSettings, check_embedding, resolved_max_length

if TYPE_CHECKING:
    from .encoder import Encoder, TextTokenizer

EXTERNAL_PREFIX = "external:"


def is_external(model: str) -> bool:
    return model.startswith(EXTERNAL_PREFIX)


def load_encoder(settings: IndexSettings, device: str | None = None, reuse: Encoder | ExternalEncoder | None = None, *,
                 tokenizer: TextTokenizer | None = None):
    """The encoder ``settings`` describe: ``reuse`` if it embeds that way, else our model loaded from them
    (with ``tokenizer``, if ``load_tokenizer`` loaded it from the same settings).

    An index made with an external encoder cannot load one: it must be passed as ``reuse``.
    """
    if reuse is not None and reuse.embeds_as(settings):
        return reuse
    if is_external(settings.model):
        given = f"; {reuse.model_name!r} was given" if reuse is not None else ""
        raise ModelError(f"this index's vectors come from the external encoder {settings.model!r}: "
                         f"open it with that encoder (e.g. through the LangChain adapter){given}")
    with collector.paused():
        from . import encoder  # the backends import torch only where they load it

        return encoder.load(settings, device, tokenizer=tokenizer)


# A stand-in for the model (an ONNX export, a saved trace) answers an index's questions only if it embeds stored
# documents as the index holds them: every cosine at least this, on up to AGREEMENT_TEXTS of them (MiniLM's export:
# 0.9999999, max abs difference 2e-7). A verdict is remembered (AGREEMENTS_FILE) by the embedding and the stand-in's
# file, so later processes that open an index of that embedding do not embed the sample again.
AGREEMENT_COSINE = 0.99999
AGREEMENT_TEXTS = 16
AGREEMENTS_FILE = "agreements.json"


def load_query_encoder(settings: IndexSettings, fingerprint: str, sample: Callable[[int], tuple[list[str], np.ndarray] | None],
                       device: str | None = None, reuse: Encoder | ExternalEncoder | None = None):
    """The encoder a search embeds questions with: ``reuse`` if it embeds as ``settings`` say; else, on the CPU in
    fp32, a stand-in that needs neither transformers nor (the ONNX export) torch, if it agrees with ``sample(n)`` (up to
    n stored texts and their vectors; None where no segment keeps whole vectors); else as ``load_encoder``.

    Stand-ins, first that agrees: an ONNX export of the index's model (``fingerprint``) where ONNX Runtime is
    installed; the TorchScript trace of the forward a load of the model saved on this machine. An ONNX-built index
    where ONNX Runtime is not installed: the model on torch, if it agrees (else the ONNX backend's error).
    """
    if reuse is not None and reuse.embeds_as(settings):
        return reuse
    if device in (None, "cpu") and settings.precision == "fp32" and not is_external(settings.model):
        for stand_in in (_onnx_export, _saved_trace):
            try:
                with collector.paused():
                    made = stand_in(settings, fingerprint)
                if made is not None and _agrees(made[0], made[1], settings, fingerprint, sample):
                    return made[0]
            except Exception:  # a stand-in is a cache: one that cannot load or run leaves the question to the model itself
                pass
        if settings.backend == "onnx" and not _onnx_runtime():
            # An ONNX-built fp32 index where ONNX Runtime is not installed: the model on torch, if it agrees.
            model = load_encoder(replace(settings, backend="torch"), device)
            if _agrees(model, None, settings, fingerprint, sample):
                return model
    return load_encoder(settings, device, reuse)


def _onnx_runtime() -> bool:
    from .encoder import onnx_backend

    return onnx_backend.available()


def _onnx_export(settings: IndexSettings, fingerprint: str):
    """The ONNX export of the index's model (or the file its folder ships) and its path, where ONNX Runtime is installed."""
    from .encoder import onnx_backend

    path = onnx_backend.query_path(settings.model, fingerprint) if _onnx_runtime() else None
    if path is None:
        return None
    return onnx_backend.OnnxEncoder(settings.model, fingerprint, pooling=settings.pooling, max_length=settings.max_length,
                                    path=path), path


def _saved_trace(settings: IndexSettings, fingerprint: str):
    """The torch backend on the trace a load of the model saved (imports torch, not transformers), and its file."""
    from .encoder import traced_backend

    return traced_backend.from_saved(settings, fingerprint)


def _agrees(encoder, path: Path | None, settings: IndexSettings, fingerprint: str, sample) -> bool:
    """Whether ``encoder`` (a stand-in loaded from the file ``path``, remembered by it; None: the model, never
    remembered) embeds stored texts as the index holds them."""
    if encoder.max_length != settings.max_length:
        return False
    key = None
    if path is not None:
        stat = Path(path).stat()
        key = json.dumps([fingerprint, settings.pooling, settings.max_length, type(encoder).__name__, str(path),
                          stat.st_size, stat.st_mtime_ns, stat.st_ino])
        if read_memo(AGREEMENTS_FILE).get(key) is True:
            return True
    found = sample(AGREEMENT_TEXTS)
    agrees = bool(found is not None and len(found[0]) and encoder.dimension == found[1].shape[1]
                  and float((encoder.encode_texts(found[0]) * found[1]).sum(axis=1).min()) >= AGREEMENT_COSINE)
    if agrees and key is not None:
        write_memo(AGREEMENTS_FILE, key, True)
    return agrees


def encoder_for_write(settings: IndexSettings, *, device: str | None = None, reuse: Encoder | ExternalEncoder | None = None):
    """The encoder a write embeds with: as ``load_encoder``, except that our model comes as a ``DeferredEncoder``
    (loaded only when a text must be encoded) where a load of its files as they are now was remembered."""
    if (reuse is None or not reuse.embeds_as(settings)) and not is_external(settings.model):
        facts = remembered_facts(settings.model)
        if facts is not None:
            return DeferredEncoder(settings, facts, device=device)
    return load_encoder(settings, device, reuse)


class DeferredEncoder:
    """Our model as ``settings`` describe, loaded on the first text to encode, and known until then by ``facts``.

    A write that encodes nothing (a rebuild of an unchanged source, an upsert
    of documents the index or its embedding cache already has as given) then
    never imports torch: its fingerprint, dimension and max length are what
    an earlier load of the same files gave (``models.remembered_facts``). The
    model loaded later must agree, or the write fails and publishes nothing.
    """

    def __init__(self, settings: IndexSettings, facts: ModelFacts, *, device: str | None = None):
        # What can be checked without torch fails now, as a load would (the device's name only if one is given).
        check_embedding(pooling=settings.pooling, precision=settings.precision, max_length=settings.max_length,
                        batch_size=settings.batch_size, device_type=device.split(":")[0] if device else None,
                        backend=settings.backend)
        self._settings, self._device = replace(settings), device
        self.model_name = canonical_model_name(settings.model)
        self.pooling, self.precision, self.backend = settings.pooling, settings.precision, settings.backend
        self.max_length = resolved_max_length(settings.max_length, facts.max_length)
        self.dimension, self.fingerprint = facts.dimension, facts.fingerprint
        self._encoder: Encoder | None = None
        self._lock = threading.Lock()  # the pipeline's reading and encoding threads may both need the model first
        self.load_seconds = 0.0

    @property
    def embedding(self) -> Embedding:
        return Embedding(self.fingerprint, self.pooling, self.max_length, self.precision, self.backend)

    def embeds_as(self, settings: IndexSettings) -> bool:
        return embeds_as(self, settings)

    def encoder(self) -> Encoder:
        """The model, loaded now if it is not yet."""
        with self._lock:
            if self._encoder is None:
                started = time.perf_counter()
                encoder = load_encoder(self._settings, self._device)
                if encoder.embedding != self.embedding or encoder.dimension != self.dimension:
                    raise ModelError(f"the files of model {self.model_name!r} do not give what models.json remembers "
                                     "of them; run the write again")
                self._encoder = encoder
                self.load_seconds = time.perf_counter() - started
            return self._encoder

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return self.encoder().tokenize(texts)

    def embed_tokens(self, token_ids: list[list[int]], progress: bool = False) -> np.ndarray:
        return self.encoder().embed_tokens(token_ids, progress)

    def encode_texts(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        return self.encoder().encode_texts(texts, progress)

    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        return self.encoder().encode_queries(queries)


def load_tokenizer(settings: IndexSettings, device: str | None = None) -> TextTokenizer | None:
    """Our model's tokenizer as ``settings`` describe, without the model (``load_encoder`` takes it to load the rest).

    None where loading the model will time its forwards (its first load on
    this machine): those timings want the cores to themselves.
    """
    with collector.paused():
        from .encoder import TextTokenizer, times_forwards

        return None if times_forwards(settings, device) else TextTokenizer.from_settings(settings)


def check_encoder(encoder: Encoder | ExternalEncoder, fingerprint: str, where: object) -> None:
    """Raise ModelError unless ``encoder`` makes the vectors whose ``fingerprint`` an index's manifest records."""
    if not fingerprint or encoder.fingerprint == fingerprint:
        return
    if is_external(encoder.model_name):
        raise ModelError(f"{where}: made with another configuration of {encoder.model_name} (its settings or dimension "
                         "differ); pass the encoder the index was made with")
    raise ModelError(f"{where}: the weights of {encoder.model_name!r} changed since this index was built; "
                     "run rebuild so every vector comes from the same model")


class ExternalEncoder:
    """Vectors from another library's embedding functions, in the place of our model.

    ``embed_documents`` (a list of texts -> a list of vectors) embeds what is
    written, ``embed_query`` (a text -> a vector) what is searched for, as
    LangChain's ``Embeddings`` define them. ``name`` identifies the encoder in
    the manifest (``external:NAME``); ``config`` is whatever else decides its
    vectors (a model name, a size): both go into the fingerprint, so the
    embedding cache, the reuse check and the unchanged-content check tell two
    encoders apart. Vectors are L2-normalised, as ours are, so search is by
    cosine. Texts are handed over whole: the encoder truncates as it does.
    """

    pooling = EXTERNAL_POOLING
    precision = "fp32"
    backend = "torch"  # what settings of an external index say: the encoder given is what embeds
    max_length = None

    def __init__(self, embed_documents: Callable[[list[str]], Sequence[Sequence[float]]],
                 embed_query: Callable[[str], Sequence[float]], *, name: str, config: Any = None):
        self._embed_documents, self._embed_query = embed_documents, embed_query
        self.model_name = EXTERNAL_PREFIX + name
        self.config = config
        self.dimension = len(embed_query("dimension"))
        identity = {"name": name, "config": config, "dimension": self.dimension}
        self.fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True, default=repr).encode()).hexdigest()

    @property
    def embedding(self) -> Embedding:
        return Embedding(self.fingerprint, self.pooling, 0, self.precision)

    def embeds_as(self, settings: IndexSettings) -> bool:
        return settings.model == self.model_name

    def tokenize(self, texts: Sequence[str]) -> list[str]:
        """The pipeline's tokenising step: nothing to do, the encoder takes texts."""
        return list(texts)

    def embed_tokens(self, texts: list[str], progress: bool = False) -> np.ndarray:
        return self.encode_texts(texts)

    def encode_texts(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """Unit vectors of documents' texts."""
        return self._unit([] if not len(texts) else self._embed_documents(list(texts)), len(texts))

    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        """Unit vectors of questions."""
        return self._unit([self._embed_query(q) for q in queries], len(queries))

    def _unit(self, vectors: Sequence[Sequence[float]], count: int) -> np.ndarray:
        matrix = np.asarray(vectors, dtype=np.float32).reshape(count, -1) if count else np.empty((0, self.dimension), np.float32)
        if matrix.shape != (count, self.dimension):
            raise ModelError(f"{self.model_name} gave vectors of shape {matrix.shape}, expected {(count, self.dimension)}")
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        return matrix / np.where(norms > 0, norms, 1)
