"""What encoders that tokenise with a ``TextTokenizer`` and embed token ids share (ONNX Runtime, the saved trace)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..models import embeds_as
from ..settings import Embedding, IndexSettings

if TYPE_CHECKING:
    from .tokenizer import TextTokenizer


class TokenEncoder:
    """An ``EncoderBackend`` made of its fields (the identity), ``text`` (the tokenizer) and the ``embed_tokens``
    (token ids -> unit vectors) each subclass defines."""

    fingerprint: str
    pooling: str
    max_length: int
    precision: str
    backend: str
    text: TextTokenizer

    @property
    def embedding(self) -> Embedding:
        return Embedding(self.fingerprint, self.pooling, self.max_length, self.precision, self.backend)

    def embeds_as(self, settings: IndexSettings) -> bool:
        return embeds_as(self, settings)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return self.text.tokenize(texts)

    def encode_texts(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """Unit vectors of ``texts``, in their order."""
        return self.embed_tokens(self.tokenize(list(texts)))

    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        return self.encode_texts(queries)
