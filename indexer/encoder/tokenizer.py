"""A model's tokenizer with the encoder's max length: token ids, without torch or the model.

Every backend tokenises with it; a first build reads and tokenises documents
with it while the model still loads (``ingest.ReadAhead``).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path

from ..errors import ModelError
from ..models import SBERT_CONFIG, canonical_model_name, file_stamp, files_identity, resolve_model_path
from ..settings import DEFAULT_MODEL, MAX_LENGTH_CAP, IndexSettings, check_embedding, resolved_max_length

# Texts longer than max_length times this many characters are tokenised from a prefix (see TextTokenizer.tokenize);
# English runs about 4-5 characters a token, so the first prefix nearly always holds enough.
CUT_CHARS_PER_TOKEN = 16


def model_max_length(model_path: str, tokenizer, config) -> int:
    """The model's own input limit, never above 512 tokens.

    ``max_seq_length`` from a ``sentence_bert_config.json`` beside the weights
    wins (256 for all-MiniLM-L6-v2, which its published scores assume); else
    the tokenizer's ``model_max_length``.
    """
    limit = None
    try:
        local = Path(model_path) / SBERT_CONFIG
        found = str(local) if local.is_file() else None
        if found is None and not Path(model_path).is_dir():
            from transformers.utils import cached_file

            found = cached_file(
                model_path,
                SBERT_CONFIG,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
            )
        if found:
            limit = int(json.loads(Path(found).read_text())["max_seq_length"])
    except (OSError, ValueError, KeyError, TypeError):
        limit = None
    if limit is None:
        limit = int(min(getattr(tokenizer, "model_max_length", MAX_LENGTH_CAP), 10**6))
    positions = getattr(config, "max_position_embeddings", None)
    if positions:
        limit = min(limit, int(positions))
    return min(limit, MAX_LENGTH_CAP)


class TextTokenizer:
    """A model's tokenizer with the encoder's ``max_length``: token ids without the model.

    An ``Encoder`` loads one (or is given one loaded already); loaded alone,
    a first build reads and tokenises documents with it while the model
    still loads (``ingest.ReadAhead``).
    """

    def __init__(self, model: str = DEFAULT_MODEL, max_length: int | None = None, *, files_only: bool = False):
        """``files_only``: read the model folder's ``tokenizer.json`` and configuration with ``tokenizers`` alone
        (milliseconds, and neither transformers nor torch is imported); ModelError where the folder has none."""
        check_embedding(max_length=max_length)
        self.model_name = canonical_model_name(model)
        self.path = resolve_model_path(model)
        self.settings = (self.model_name, max_length)  # what an Encoder given this tokenizer checks it was asked for
        # The model's files before anything of them is read: what forward choices are remembered by, and what the
        # facts a write remembers from this load are (see models.remember_facts).
        self.stamp, self.identity = file_stamp(self.path), files_identity(self.path)
        load = _tokenizer_from_files if files_only else _load_tokenizer
        self.tokenizer, config = load(self.model_name, self.path)
        self.limit = model_max_length(self.path, self.tokenizer, config)
        self.max_length = resolved_max_length(max_length, self.limit)
        self._backend = self._plain_backend()
        self._ascii = _ascii_shortcut(self._backend) if self._backend is not None else None

    @classmethod
    def from_settings(cls, settings: IndexSettings) -> TextTokenizer:
        """The tokenizer an index's settings describe (model and max length)."""
        return cls(settings.model, settings.max_length)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, truncated to ``max_length``, unpadded.

        Equal to tokenising each text whole, but a text over ``CUT_CHARS_PER_TOKEN``
        characters a token is tokenised from a prefix: the tokenizer works
        through the whole text before truncating (a 50 MB text took 88 s and
        7.9 GB for 256 tokens). A prefix's tokens are the whole text's only up
        to the last run of spaces in it (a word cut in two tokenises
        differently), so the prefix doubles until ``max_length`` tokens end
        before that run, or it is the whole text.
        """
        texts = list(texts)
        budget = self.max_length * CUT_CHARS_PER_TOKEN
        can_cut = getattr(self.tokenizer, "is_fast", False) and self.tokenizer.truncation_side == "right"
        long = [i for i, text in enumerate(texts) if len(text) > budget] if can_cut else []
        if not long:
            return self._token_ids(texts)
        token_ids = self._token_ids([t if len(t) <= budget else "" for t in texts])
        while long:
            batch = self._token_ids([texts[i][:budget] for i in long], return_offsets_mapping=True)
            left = []
            for i, ids, offsets in zip(long, batch["input_ids"], batch["offset_mapping"]):
                text = texts[i]
                if len(text) <= budget or (len(ids) == self.max_length and max(e for _, e in offsets) <= _last_spaces(text, budget)):
                    token_ids[i] = ids
                else:
                    left.append(i)
            long, budget = left, budget * 2
        return token_ids

    def _plain_backend(self):
        """A copy of a fast tokenizer's Rust tokenizer that truncates to ``max_length`` and never pads, or None.

        Calling it directly gives the same ids as the ``transformers`` wrapper
        without building a Python dict per text (a third of tokenising time).
        """
        backend = getattr(self.tokenizer, "backend_tokenizer", None) if getattr(self.tokenizer, "is_fast", False) else None
        if backend is None:
            return None
        from tokenizers import Tokenizer

        plain = Tokenizer.from_str(backend.to_str())
        plain.no_padding()
        plain.enable_truncation(self.max_length, direction=self.tokenizer.truncation_side)
        return plain

    def _token_ids(self, texts: list[str], **options):
        """The tokenizer's ids of ``texts``, truncated to ``max_length``; with ``options``, its whole output."""
        if not options and self._backend is not None:
            if self._ascii is None:
                return _ids(self._backend, texts)
            bare, normalize = self._ascii
            ascii = [text.isascii() for text in texts]
            token_ids = _ids(bare, [normalize(text) for text, plain in zip(texts, ascii) if plain])
            if len(token_ids) == len(texts):
                return token_ids
            shortcut, whole = iter(token_ids), iter(_ids(self._backend, [text for text, plain in zip(texts, ascii) if not plain]))
            return [next(shortcut) if plain else next(whole) for plain in ascii]
        out = self.tokenizer(
            texts,
            truncation=True,
            max_length=self.max_length,
            return_attention_mask=False,
            return_token_type_ids=False,
            **options,
        )
        return out if options else out["input_ids"]


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    # encode_batch_fast (tokenizers >= 0.21) skips the character offsets, which nothing here reads: 20% faster.
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    return [encoding.ids for encoding in encode(texts)]


# What BERT's normalizer does to ASCII with clean_text: drops control characters, and \t \n \r become spaces.
_CLEAN_ASCII = {**dict.fromkeys((*range(32), 127)), **{ord(c): " " for c in "\t\n\r"}}


def _ascii_shortcut(plain):
    """(``plain`` without its normalizer, a Python function normalising an ASCII text the same way), or None.

    Only BERT's normalizer (with ``clean_text``, which transformers always
    sets) is known. On ASCII its accent stripping and CJK spacing have nothing
    to do: it drops control characters and lowercases, which ``str.translate``
    and ``str.lower`` do in C, while the Rust normalizer tracks every
    character's alignment (a third of tokenising time, measured on the Debian
    descriptions). Other texts keep the whole tokenizer. A test compares the
    ids with the tokenizer's over every ASCII character, lowercasing or not.
    """
    spec = json.loads(plain.to_str())
    normalizer = spec.get("normalizer") or {}
    if normalizer.get("type") != "BertNormalizer" or not normalizer.get("clean_text", True):
        return None
    from tokenizers import Tokenizer

    bare = Tokenizer.from_str(json.dumps({**spec, "normalizer": None}))
    if normalizer.get("lowercase", True):
        return bare, lambda text: text.translate(_CLEAN_ASCII).lower()
    return bare, lambda text: text.translate(_CLEAN_ASCII)


def _last_spaces(text: str, end: int) -> int:
    """Where the last run of spaces in ``text[:end]`` starts, -1 if there is none.

    Everything before it tokenises alike whatever follows: a space ends a word
    for the BERT, byte-level BPE and SentencePiece pre-tokenizers.
    """
    last = text.rfind(" ", 0, end)
    return -1 if last < 0 else len(text[:last].rstrip(" "))


class _FileTokenizer:
    """What ``TextTokenizer`` reads of a transformers fast tokenizer, from a model folder's files alone."""

    is_fast = True

    def __init__(self, backend, settings: dict, special: dict):
        self.backend_tokenizer = backend
        self.truncation_side = settings.get("truncation_side", "right")
        self.model_max_length = int(min(settings.get("model_max_length") or MAX_LENGTH_CAP, 10**6))
        pad = settings.get("pad_token") or special.get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        self.pad_token_id = backend.token_to_id(pad) if pad else None

    def __call__(self, texts: list[str], *, max_length: int, return_offsets_mapping: bool = False, **_):
        backend = self._truncating(max_length)
        encodings = backend.encode_batch(texts)
        out = {"input_ids": [e.ids for e in encodings]}
        if return_offsets_mapping:
            out["offset_mapping"] = [e.offsets for e in encodings]
        return out

    def _truncating(self, max_length: int):
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(self.backend_tokenizer.to_str())
        backend.no_padding()
        backend.enable_truncation(max_length, direction=self.truncation_side)
        return backend


def _tokenizer_from_files(name: str, path: str):
    """The tokenizer and configuration of the model folder ``path`` through ``tokenizers`` alone (see ``_FileTokenizer``)."""
    from types import SimpleNamespace

    from tokenizers import Tokenizer

    folder = Path(path)

    def read(file: str) -> dict:
        with contextlib.suppress(OSError, ValueError):
            found = json.loads((folder / file).read_text())
            if isinstance(found, dict):
                return found
        return {}

    try:
        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception as exc:  # missing, unreadable or not a tokenizer: the caller loads through transformers instead
        raise ModelError(f"cannot load the tokenizer of model {name!r} from its files: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    config = read("config.json")
    return (_FileTokenizer(backend, read("tokenizer_config.json"), read("special_tokens_map.json")),
            SimpleNamespace(max_position_embeddings=config.get("max_position_embeddings")))


def _load_tokenizer(name: str, path: str):
    """The model's tokenizer and configuration (no model code is imported)."""
    from transformers import AutoConfig, AutoTokenizer

    with loading(name):
        return AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path)


@contextlib.contextmanager
def loading(name: str):
    """transformers without its progress bars and warnings; its load errors as ModelError."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load model {name!r}: {first}") from None
