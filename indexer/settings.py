"""The settings an index is built with, saved whole in every version's manifest."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import ModelError

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
POOLINGS = ("mean", "cls")
# Encoder backends (``indexer.encoder``): torch (transformers), or onnx (ONNX Runtime running an export of the model).
BACKENDS = ("torch", "onnx")
PRECISIONS = ("fp32", "bf16", "fp16", "int8")
# Most tokens per text an index may be built with (``max_length``).
MAX_LENGTH_CAP = 512
# Search modes and hybrid fusions (``indexer.query``), build engines (``indexer.ray_engine``):
# kept here, free of heavy imports, so the command line can offer them as choices.
MODES = ("dense", "keyword", "hybrid")
FUSIONS = ("score", "rrf")
# How a segment keeps its vectors in memory (``indexer.vectors.rescored``): whole, or int8 or binary codes
# whose candidates are rescored with the whole vectors kept on disk.
VECTOR_STORAGE = ("float32", "int8", "binary")
ENGINES = ("local", "ray")
# A document's text is refused above this size: beyond the model's few hundred
# tokens only the stored text grows, and a 50 MB "document" is usually a mistake.
MAX_DOCUMENT_BYTES = 10 * 2**20


@dataclass
class IndexSettings:
    """How documents are read and embedded.

    ``max_length`` of ``None`` means the model's own limit; it is resolved when
    the index is built and the resolved value is what the manifest keeps, so a
    query is always embedded exactly as the documents were. ``index_type`` is
    flat, hnsw, ivf, ivfpq, auto (chosen by size and the ``memory`` budget,
    e.g. "2GB") or a FAISS factory string; it is resolved again on every rebuild.
    """

    model: str = DEFAULT_MODEL
    pooling: str = "mean"
    max_length: int | None = None
    batch_size: int | None = None
    batch_tokens: int | None = None
    precision: str = "fp32"
    backend: str = "torch"
    index_type: str = "flat"
    memory: str | None = None
    vectors: str = "float32"
    id_field: str | None = None
    text_fields: list[str] = field(default_factory=list)
    source: str | None = None
    max_document_bytes: int = MAX_DOCUMENT_BYTES

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexSettings:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# The pooling an external encoder's vectors are recorded with: it pools (and truncates) as it does.
EXTERNAL_POOLING = "external"


@dataclass(frozen=True)
class WriteOptions:
    """What every write takes besides its input (the CLI's --device, --keep and --wait, and a progress bar).

    ``device``: where the model runs if the write must load it (default: the
    best there is); ``keep``: versions kept after publishing, older ones
    pruned; ``wait``: seconds to wait for another writer's lock (0: fail at
    once with ``IndexLockedError``); ``progress``: a progress bar on stderr
    while documents are encoded.
    """

    device: str | None = None
    keep: int = 3
    wait: float = 0.0
    progress: bool = False


@dataclass(frozen=True)
class Embedding:
    """What, besides the text, decides a vector: the model's fingerprint (weights and tokenizer), pooling, max
    length, precision and backend. Checked when made.

    ``key`` is how segments (``segment.json``) and the embedding cache record it; a
    write reuses a vector only under the same key, and a rebuild whose every
    segment has the encoder's key keeps them. (The torch backend's key has no
    backend part: it is the key indexes were written with before there were others.)
    """

    fingerprint: str
    pooling: str
    max_length: int
    precision: str = "fp32"
    backend: str = "torch"

    def __post_init__(self):
        if self.pooling != EXTERNAL_POOLING:
            check_embedding(pooling=self.pooling, precision=self.precision, max_length=self.max_length, backend=self.backend)

    @property
    def key(self) -> str:
        parts = [self.fingerprint, self.pooling, str(self.max_length), self.precision]
        return "|".join(parts if self.backend == "torch" else [*parts, self.backend])


def check_embedding(*, pooling: str | None = None, precision: str | None = None, max_length: int | None = None,
                    batch_size: int | None = None, device_type: str | None = None, backend: str | None = None) -> None:
    """Raise ModelError unless what is given is a pooling, precision, max length, batch size, device and backend an
    encoder embeds with."""
    if backend is not None and backend not in BACKENDS:
        raise ModelError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "onnx" and precision not in (None, "fp32", "int8"):
        raise ModelError(f"the onnx backend embeds in fp32 or int8, not {precision}")
    if backend == "onnx" and device_type not in (None, "cpu"):
        raise ModelError("the onnx backend runs on the CPU only")
    if batch_size is not None and batch_size < 1:
        raise ModelError(f"batch size must be at least 1, got {batch_size}")
    if pooling is not None and pooling not in POOLINGS:
        raise ModelError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    if precision is not None and precision not in PRECISIONS:
        raise ModelError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if max_length is not None and not 1 <= max_length <= MAX_LENGTH_CAP:
        raise ModelError(f"max length must be between 1 and {MAX_LENGTH_CAP}, got {max_length}")
    if precision == "fp16" and device_type not in (None, "cuda"):
        raise ModelError("precision fp16 needs a CUDA device; use bf16 on CPU")
    if precision == "int8" and device_type not in (None, "cpu"):
        raise ModelError("precision int8 runs on the CPU only")


def resolved_max_length(asked: int | None, limit: int) -> int:
    """The max length an encoder embeds with: ``asked``, or the model's own ``limit`` if None, never above it."""
    return min(asked, limit) if asked else limit
