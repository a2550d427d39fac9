"""Text -> unit vectors with a BERT-family model: tokenise, run, pool, normalise.

Texts are tokenised once, sorted by token length and batched, so each batch
pads only to its own longest text; vectors come back in input order. Pooling
is masked mean pooling over ``last_hidden_state`` (what sentence-transformers
models such as all-MiniLM-L6-v2 are trained for) or the ``[CLS]`` vector.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import platform
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import interrupts
from .errors import ArgumentError, ModelError
from .models import (
    SBERT_CONFIG,
    ModelFacts,
    canonical_model_name,
    embeds_as,
    file_stamp,
    files_identity,
    read_memo,
    remember_facts,
    resolve_model_path,
    write_memo,
)
from .settings import DEFAULT_MODEL, MAX_LENGTH_CAP, IndexSettings, check_embedding, embedding_config, resolved_max_length

PROGRESS_MIN_TEXTS = 1000
PAD_MULTIPLE = 8
# Padded tokens per forward pass when batch_tokens is not given: small batches
# stay in CPU cache (measured best on 2 cores); a GPU wants far larger ones
# (H200, MiniLM shape, fp16: 27,900 docs/s at 131,072 tokens, 20,600 when grown from 16,384).
CPU_BATCH_TOKENS = 1024
GPU_BATCH_TOKENS = 65536
# Unless batch_tokens is given, the budget grows from the above by doubling, up to these, while
# throughput measured on the batches themselves improves: a tiny model wants far larger batches than MiniLM.
# On CPU the limit is shared by the batches running side by side (one per worker), so memory stays that
# of one 32k-token batch however many cores there are.
CPU_BATCH_TOKENS_MAX = 32768
GPU_BATCH_TOKENS_MAX = 262144
# Texts longer than max_length times this many characters are tokenised from a prefix (see TextTokenizer.tokenize);
# English runs about 4-5 characters a token, so the first prefix nearly always holds enough.
CUT_CHARS_PER_TOKEN = 16
# Batches of at most this many texts are queries: on CUDA they replay a CUDA graph captured once per shape
# (one launch instead of a hundred small kernels launched from Python, most of a short query's time); on CPU
# they run on the number of threads measured fastest for one query at load.
QUERY_TEXTS = 4
# On an accelerator, encode_texts tokenises inputs longer than this in parts, the next while the model runs.
TOKENIZE_AHEAD = 8192
GRAPH_MAX_SHAPES = 64
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


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Average of the token vectors, padding excluded (no mask: a batch without padding)."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def cls_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The first ([CLS]) token's vector."""
    return hidden[:, 0]


POOLERS = {"mean": mean_pool, "cls": cls_pool}


def model_max_length(model_path: str, tokenizer, config) -> int:
    """The model's own input limit, never above 512 tokens.

    ``max_seq_length`` from a ``sentence_bert_config.json`` beside the weights
    wins (256 for all-MiniLM-L6-v2, which its published scores assume); else
    the tokenizer's ``model_max_length``.
    """
    limit = None
    try:
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

    def __init__(self, model: str = DEFAULT_MODEL, max_length: int | None = None):
        check_embedding(max_length=max_length)
        self.model_name = canonical_model_name(model)
        self.path = resolve_model_path(model)
        self.settings = (self.model_name, max_length)  # what an Encoder given this tokenizer checks it was asked for
        # The model's files before anything of them is read: what forward choices are remembered by, and what the
        # facts a write remembers from this load are (see models.remember_facts).
        self.stamp, self.identity = file_stamp(self.path), files_identity(self.path)
        self.tokenizer, config = _load_tokenizer(self.model_name, self.path)
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


class Encoder:
    """A loaded model that turns texts into L2-normalised float32 vectors.

    Texts are batched by length: a batch holds at most ``batch_size`` texts and
    at most ``batch_tokens`` padded tokens. ``precision`` is ``fp32`` (exact),
    ``bf16`` (autocast on CPU, fast with AVX512-BF16 or AMX; on a GPU the
    model is cast to bf16), ``fp16`` (GPU only, model cast to fp16) or
    ``int8`` (dynamic quantisation of the linear layers, CPU only); see the
    README for what each costs in quality. ``tokenizer``: this model's
    ``TextTokenizer`` with the same ``max_length``, if one is loaded already.
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        pooling: str = "mean",
        max_length: int | None = None,
        device: str | None = None,
        batch_size: int | None = None,
        batch_tokens: int | None = None,
        precision: str = "fp32",
        *,
        tokenizer: TextTokenizer | None = None,
    ):
        check_embedding(pooling=pooling, precision=precision, max_length=max_length, batch_size=batch_size)
        self.model_name = canonical_model_name(model)
        self.pooling = pooling
        self.precision = precision
        self.batch_size = batch_size
        self.device = choose_device(device)
        check_embedding(precision=precision, device_type=self.device.type)
        cpu = self.device.type == "cpu"
        # Workers for batches side by side on CPU: the thread count at load (the process-wide count changes
        # while batches or queries run, and another thread's query may be holding it when a build starts).
        self.workers = torch.get_num_threads() if cpu else 1
        cpu_limit = max(CPU_BATCH_TOKENS, CPU_BATCH_TOKENS_MAX // self.workers)
        self.budget = BatchBudget(batch_tokens or (CPU_BATCH_TOKENS if cpu else GPU_BATCH_TOKENS),
                                  limit=batch_tokens or (cpu_limit if cpu else GPU_BATCH_TOKENS_MAX))
        if tokenizer is not None and tokenizer.settings != (self.model_name, max_length):
            raise ModelError(f"the tokenizer given was loaded for {tokenizer.settings}, not {(self.model_name, max_length)}")
        self.text = tokenizer or TextTokenizer(model, max_length)
        self.tokenizer, self.max_length = self.text.tokenizer, self.text.max_length
        path = self._path = self.text.path
        self._stamp = self.text.stamp
        self._weights = _load_model(self.model_name, path)
        self._weights.to(self.device).eval()
        # On a GPU the half precisions run a half model (no per-op casts, the same fast path as fp32); on CPU
        # bf16 stays autocast, which keeps layer norms and softmax in fp32. The fingerprint reads the files again.
        self._cast = self.device.type == "cuda" and precision in HALF_DTYPES
        if self._cast:
            self._weights.to(HALF_DTYPES[precision])
        self.model = _quantized(self._weights) if precision == "int8" else self._weights
        self._forward = self._eager_forward
        sdpa = getattr(self._weights.config, "_attn_implementation", None) == "sdpa"
        self._mask_form = {"cuda": "square", "cpu": "row"}.get(self.device.type) if sdpa else None
        self._positions = int(getattr(self._weights.config, "max_position_embeddings", None) or self.max_length)
        self.dimension = int(self._weights.config.hidden_size)
        self._pool = POOLERS[pooling]
        self._pad_id = self.tokenizer.pad_token_id or 0
        self.query_threads: int | None = None  # None: queries run on torch's thread count like everything else
        # On CPU a batch of texts of one length runs without padding or attention mask (``_unmasked``): for a small
        # model the mask is a real share of the work (a 2-layer BERT ran 12-14% faster on such batches).
        self._unmasked = None
        if cpu:
            self._forward, self._unmasked = self._fastest_forward() if precision == "fp32" else (self._eager_forward, self._eager_unmasked)
        self._embed = _Graphed(self._unit_vectors) if self.device.type == "cuda" else self._unit_vectors

    @classmethod
    def from_settings(cls, settings: IndexSettings, device: str | None = None, *, tokenizer: TextTokenizer | None = None) -> Encoder:
        """A new encoder as an index's settings describe (``external.load_encoder`` reuses a loaded one first).

        ``tokenizer``: the one ``TextTokenizer.from_settings`` loaded from the same settings, if it has.
        """
        return cls(
            settings.model,
            settings.pooling,
            settings.max_length,
            device,
            settings.batch_size,
            settings.batch_tokens,
            settings.precision,
            tokenizer=tokenizer,
        )

    def embeds_as(self, settings: IndexSettings) -> bool:
        """Whether this encoder embeds texts exactly as ``settings`` describe."""
        return embeds_as(self, settings)

    @functools.cached_property
    def fingerprint(self) -> str:
        """SHA-256 of the (unquantised) weights and the tokenizer: it changes whenever the vectors could.

        Packed or half-cast models no longer hold their fp32 weights; those are
        read again from the same files (checked unchanged since the model was loaded).
        Only writes need the fingerprint, so query processes never pay for it.
        """
        weights = self._weights
        if self._cast or any(isinstance(m, _PackedLinear) for m in weights.modules()):
            if file_stamp(self._path) != self._stamp:
                raise ModelError(f"the files of model {self.model_name!r} changed since it was loaded; restart")
            weights = _load_model(self.model_name, self._path)
        digest = hashlib.sha256()
        for name, tensor in sorted(weights.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy())
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            # Truncation and padding are call-time state the tokenizer keeps in its JSON; not part of its identity.
            tokenizer = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        else:
            tokenizer = sorted(self.tokenizer.get_vocab().items())
        digest.update(json.dumps(tokenizer, sort_keys=True).encode())
        fingerprint = digest.hexdigest()
        # The next write that encodes nothing need not load the model to know this (see models.remembered_facts).
        remember_facts(self._path, self.text.identity, ModelFacts(fingerprint, self.dimension, self.text.limit))
        return fingerprint

    @property
    def embedding_config(self) -> str:
        """Everything besides the text that decides a vector: the embedding cache's key prefix."""
        return embedding_config(self.fingerprint, self.pooling, self.max_length, self.precision)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, truncated to ``max_length``, unpadded (``TextTokenizer.tokenize``)."""
        return self.text.tokenize(texts)

    @property
    def batch_tokens(self) -> int:
        """Padded tokens per forward pass now (see ``BatchBudget``)."""
        return self.budget.tokens

    def encode_texts(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """Embed ``texts``; row i of the result is the unit vector of ``texts[i]``."""
        texts = list(texts)
        with self._progress(len(texts), progress) as bar:
            if self.device.type == "cpu" or len(texts) <= TOKENIZE_AHEAD:
                return self._embed_flat(*self._flat_tokens(texts), bar)
            # On an accelerator the next part is tokenised while the model runs this one (the tokenizer
            # releases the GIL); on CPU both want every core, so they take turns.
            out = np.empty((len(texts), self.dimension), dtype=np.float32)
            with ThreadPoolExecutor(1, thread_name_prefix="tokenize") as pool:
                ahead = pool.submit(self._flat_tokens, texts[:TOKENIZE_AHEAD])
                for start in range(0, len(texts), TOKENIZE_AHEAD):
                    flat = ahead.result()
                    if start + TOKENIZE_AHEAD < len(texts):
                        ahead = pool.submit(self._flat_tokens, texts[start + TOKENIZE_AHEAD : start + 2 * TOKENIZE_AHEAD])
                    out[start : start + TOKENIZE_AHEAD] = self._embed_flat(*flat, bar)
            return out

    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        """Embed questions: the same as ``encode_texts`` (our models embed both alike)."""
        return self.encode_texts(queries)

    def embed_tokens(self, token_ids: list[list[int]], progress: bool = False) -> np.ndarray:
        """Embed texts given as token ids (``tokenize``); row i is the unit vector of ``token_ids[i]``."""
        with self._progress(len(token_ids), progress) as bar:
            return self._embed_flat(*flatten(token_ids), bar)

    def _flat_tokens(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return flatten(self.tokenize(texts) if texts else [])

    @staticmethod
    def _progress(texts: int, progress: bool) -> tqdm:
        return tqdm(total=texts, desc="encoding", unit="doc", disable=not progress or texts < PROGRESS_MIN_TEXTS, file=sys.stderr)

    def _embed_flat(self, flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray, bar: tqdm) -> np.ndarray:
        """Unit vectors of texts held as one flat id array (``flatten``), in their order."""
        out = np.empty((len(lengths), self.dimension), dtype=np.float32)
        if not len(lengths):
            return out
        order = np.argsort(-lengths, kind="stable")
        batches = length_batches(order, lengths, self.batch_size, self.budget, uniform=self._unmasked is not None)
        first = next(batches)
        if self.workers > 1 and len(first) < len(lengths):  # workers is 1 off the CPU
            return self._embed_on_workers(flat, starts, lengths, itertools.chain([first], batches), out, bar)
        # Vectors stay on the device, in length order, until the end: on a GPU no sync per batch, so the next
        # batch is padded, copied and queued while this one runs (syncs only while the budget is measured).
        found, done = torch.empty(out.shape, device=self.device), 0
        with torch.inference_mode(), self._autocast(), self._threads(len(lengths)):
            for rows in itertools.chain([first], batches):
                interrupts.check()
                started = time.perf_counter()
                found[done : done + len(rows)] = self._embed(*self._pad(flat, starts[rows], lengths[rows]))
                done += len(rows)
                if not self.budget.settled:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    self.budget.record(int(lengths[rows].sum()), time.perf_counter() - started)
                bar.update(len(rows))
            out[order] = found.cpu().numpy()
        return out

    def _embed_on_workers(self, flat, starts, lengths, batches: Iterator[np.ndarray], out: np.ndarray, bar: tqdm) -> np.ndarray:
        """On CPU, batches side by side on ``workers`` threads, each running the model on one torch thread.

        One thread per batch beats all threads on each batch: small matrices
        split across cores spend their time waiting for each other (a tiny
        model ran 1.55x, all-MiniLM-L6-v2 1.1x faster on 2 cores), and a core
        taken by the tokenizer or SQLite stalls one batch, not every one. Each
        vector is computed by one thread whatever the worker count, so it does
        not depend on how many cores the machine has.
        """
        def run(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
            with torch.inference_mode(), self._autocast():
                started = time.perf_counter()
                vectors = self._embed(*self._pad(flat, starts[rows], lengths[rows])).numpy()
                return rows, vectors, time.perf_counter() - started

        def collect(done: Future) -> None:
            rows, vectors, seconds = done.result()
            out[rows] = vectors
            self.budget.record(int(lengths[rows].sum()), seconds)
            bar.update(len(rows))

        with _thread_count(1, torch.get_num_threads()), ThreadPoolExecutor(self.workers, thread_name_prefix="encode") as pool:
            pending: deque[Future] = deque()
            for rows in batches:
                interrupts.check()  # Ctrl-C between batches: never inside a future's lock (see interrupts)
                pending.append(pool.submit(run, rows))
                while pending and (len(pending) > 2 * self.workers or pending[0].done()):
                    collect(pending.popleft())
            while pending:
                collect(pending.popleft())
        return out

    def _unit_vectors(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self._forward(input_ids, attention_mask) if attention_mask is not None else self._unmasked(input_ids)
        return self._vectors(hidden, attention_mask)

    def _vectors(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return torch.nn.functional.normalize(self._pool(hidden.float(), attention_mask), p=2, dim=1)

    def _eager_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=model_mask(attention_mask, self._mask_form)).last_hidden_state

    def _eager_unmasked(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).last_hidden_state

    def _fastest_forward(self):
        """The fastest, by timing, of the CPU forwards whose vectors match eager's within 1e-5 on a check batch,
        and its form without attention mask (None for the packed model).

        Candidates: the eager model; a TorchScript trace (no per-layer Python);
        the model with its linear layers on oneDNN's prepacked fp32 kernels
        (replacing the dense ones layer by layer, so the weights are held
        once). Each is timed on a short query plus a batch of about 1,000
        tokens, after a warm-up (oneDNN compiles kernels per shape). Which
        wins depends on the CPU: on AVX-512 machines here the packed model
        (one query about 3 ms against 6 ms eager on 2 cores), on an AVX2 EPYC
        packing gained nothing. The choice, and the number of threads a single
        query runs fastest on, are made once per process and model, so every
        encoder of a process computes the same vectors; both are remembered in
        ``~/.cache/indexer/forwards.json`` (under ``$XDG_CACHE_HOME`` if set),
        keyed by the model's files, torch, the CPU and the thread count, so
        later processes load as fast as before (the timing costs seconds, once).
        The packed model always takes a mask: oneDNN compiles kernels per input
        width, and batches of one length come in every width (all-MiniLM-L6-v2
        gained nothing measurable from dropping the mask).
        """
        import warnings

        def batch(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
            return self._pad(*flatten(self.tokenize(texts)))

        def matches(forward) -> bool:
            return (self._vectors(forward(*check), check[1]) - expected).abs().max().item() <= 1e-5

        def seconds(forward, runs: int = 3) -> float:
            forward(*query), forward(*work)
            return min(_timed(lambda: (forward(*query), forward(*work))) for _ in range(runs))

        key = _machine_key(self._path, self._stamp)
        chosen, self.query_threads = _known_choice(key) or (None, None)
        example = batch(["a short example", "a rather longer example sentence, padded against the short one"])
        check = batch(["one", "two words", "and a third text that is longer than both of the others together"])
        query = batch(["a short question about packages"])
        work = batch([f"text number {i}, " + "a description of a package and what it does " * 6 for i in range(16)])
        timings, traced = {}, None
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            expected = self._vectors(self._eager_forward(*check), check[1])
            if chosen in (None, "eager"):
                timings["eager"] = seconds(self._eager_forward) if chosen is None else 0.0
            if chosen in (None, "traced"):
                try:
                    traced = _shared_trace(f"{key}|{self._mask_form}", lambda: _frozen_trace(self.model, *example, mask_form=self._mask_form))
                    if matches(traced):
                        timings["traced"] = seconds(traced) if chosen is None else 0.0
                except Exception:  # any model the tracer cannot handle runs another way
                    pass
            if chosen in (None, "packed") and torch.backends.mkldnn.is_available():
                try:
                    pack_linears(self.model)
                    packed = _HiddenStates(self.model, self._mask_form)
                    if matches(packed):
                        timings["packed"] = seconds(packed) if chosen is None else 0.0
                except Exception:  # a model or torch build without these kernels runs another way
                    pass
            chosen = min(timings, key=timings.__getitem__) if timings else "eager"
            if chosen != "packed" and any(isinstance(m, _PackedLinear) for m in self.model.modules()):
                self._weights = _load_model(self.model_name, self._path)
                self.model = self._weights.eval()
            forward = {"packed": lambda: _HiddenStates(self.model, self._mask_form), "traced": lambda: traced}.get(chosen, lambda: self._eager_forward)()
            if self.query_threads is None:
                self.query_threads = _fastest_threads(lambda: forward(*query))
            unmasked = {"packed": lambda: None, "traced": lambda: self._traced_unmasked(key)}.get(chosen, lambda: self._eager_unmasked)()
        if _CHOSEN.get(key) != (chosen, self.query_threads):
            _CHOSEN[key] = (chosen, self.query_threads)
            write_memo(FORWARDS_FILE, key, list(_CHOSEN[key]))
        return forward, unmasked

    def _traced_unmasked(self, key: str):
        """The model traced without attention mask, if it matches eager's within 1e-5 (else eager's)."""
        example, check = torch.tensor(self.tokenize(["two words"] * 2)), torch.tensor(self.tokenize(["a check text of one length"] * 3))
        try:
            traced = _shared_trace(f"{key}|unmasked", lambda: _frozen_trace(self.model, example))
            if (traced(check) - self._eager_unmasked(check)).abs().max().item() <= 1e-5:
                return traced
        except Exception:  # a model the tracer cannot handle runs eager
            pass
        return self._eager_unmasked

    def _threads(self, texts: int):
        """On CPU, a query (at most ``QUERY_TEXTS`` texts) runs on ``query_threads``; the count is restored after it."""
        current = torch.get_num_threads()
        if self.query_threads is None or texts > QUERY_TEXTS or self.query_threads == current:
            return contextlib.nullcontext()
        return _thread_count(self.query_threads, current)

    def _autocast(self):
        if self.precision in HALF_DTYPES and not self._cast:
            return torch.autocast(self.device.type, dtype=HALF_DTYPES[self.precision])
        return contextlib.nullcontext()

    def _pad(self, flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Input ids and attention mask of texts held as one flat id array with start offsets (``flatten``): one numpy gather.

        Texts of one length, where the encoder runs them unmasked, come unpadded and without a mask (None).
        """
        if self._unmasked is not None and lengths.min() == lengths.max():
            return torch.from_numpy(flat[starts[:, None] + np.arange(int(lengths[0]))]), None
        # Widths rounded up to a multiple of PAD_MULTIPLE: oneDNN compiles kernels for every input shape
        # and keeps them (~2 MB per width for MiniLM); masked pads change no vector.
        longest = int(lengths.max())
        width = min(-(-longest // PAD_MULTIPLE) * PAD_MULTIPLE, max(self._positions, longest))
        columns = np.arange(width)
        attention_mask = (columns < lengths[:, None]).astype(np.int64)
        input_ids = np.where(attention_mask, flat[np.minimum(starts[:, None] + columns, len(flat) - 1)], self._pad_id)
        if self.device.type == "cuda":  # from page-locked memory, so the copy runs behind the host's next batch
            return (torch.from_numpy(input_ids).pin_memory().to(self.device, non_blocking=True),
                    torch.from_numpy(attention_mask).pin_memory().to(self.device, non_blocking=True))
        return torch.from_numpy(input_ids).to(self.device), torch.from_numpy(attention_mask).to(self.device)


class _Graphed:
    """``embed`` (ids, mask -> unit vectors), replayed from a CUDA graph for batches of up to ``QUERY_TEXTS`` texts.

    One graph is captured per input shape on its first use (widths come in
    steps of ``PAD_MULTIPLE``, so a few dozen at most) and its vectors are
    checked against the plain call; any capture that fails or differs leaves
    that shape on the plain call. Larger batches always take the plain call:
    their kernels are long enough to hide the launches.
    """

    def __init__(self, embed):
        self.embed = embed
        self.graphs: dict[tuple[int, ...], tuple | None] = {}
        self.pool = None
        # A graph's input and output buffers are shared: one thread at a time fills, replays and copies them out.
        self.lock = threading.Lock()

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        shape = tuple(input_ids.shape)
        if shape[0] > QUERY_TEXTS:
            return self.embed(input_ids, attention_mask)
        with self.lock:
            if shape not in self.graphs and len(self.graphs) < GRAPH_MAX_SHAPES:
                self.graphs[shape] = self._capture(input_ids, attention_mask)
            graph = self.graphs.get(shape)
            if graph is None:
                return self.embed(input_ids, attention_mask)
            replay, ids, mask, out = graph
            ids.copy_(input_ids)
            mask.copy_(attention_mask)
            replay.replay()
            return out.clone()

    def _capture(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        expected = self.embed(input_ids, attention_mask)
        ids, mask = input_ids.clone(), attention_mask.clone()
        try:
            side = torch.cuda.Stream(ids.device)
            side.wait_stream(torch.cuda.current_stream(ids.device))
            with torch.cuda.stream(side):  # warm-up off the main stream, as graph capture requires
                self.embed(ids, mask)
            torch.cuda.current_stream(ids.device).wait_stream(side)
            self.pool = self.pool or torch.cuda.graph_pool_handle()
            replay = torch.cuda.CUDAGraph()
            with torch.cuda.graph(replay, pool=self.pool):
                out = self.embed(ids, mask)
            replay.replay()
            if (out - expected).abs().max().item() > 1e-5:
                return None
        except RuntimeError:  # a model or driver that cannot be captured runs plainly
            torch.cuda.synchronize(ids.device)
            return None
        return replay, ids, mask, out

def model_mask(attention_mask: torch.Tensor, form: str | None) -> torch.Tensor:
    """A [batch, width] attention mask as the model is given it: as it is (``form`` None), or as SDPA's boolean mask.

    transformers uses a 4-D mask as given instead of building one: ``row``
    ([batch, 1, 1, width]) on CPU, where building it took a sixth of a tiny
    model's padded batches; ``square`` (what transformers builds) on CUDA,
    where it would also check a 2-D mask on the host, a device sync per batch.
    """
    if form is None:
        return attention_mask
    mask = attention_mask.bool()[:, None, None, :]
    return mask.expand(-1, 1, mask.shape[-1], -1) if form == "square" else mask


class _HiddenStates(torch.nn.Module):
    """A model's last hidden state as a plain tensor function of ids and a [batch, width] mask, for tracing."""

    def __init__(self, model: torch.nn.Module, mask_form: str | None = None):
        super().__init__()
        self.model = model
        self.mask_form = mask_form

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is not None:
            attention_mask = model_mask(attention_mask, self.mask_form)
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


# TorchScript keeps every graph it traces, frozen weights included, for the life of the process: tracing at each
# load grew a process by a copy of the model per load (a tiny test model: 11 MB a load). So a trace is made once
# per model files (``_machine_key``) and form, and every encoder of those files in the process shares it.
_TRACES: dict[str, torch.jit.ScriptModule] = {}


def _shared_trace(key: str, trace):
    """The trace made for ``key`` in this process, made now by ``trace()`` if there is none."""
    if key not in _TRACES:
        _TRACES[key] = trace()
    return _TRACES[key]


def _frozen_trace(model: torch.nn.Module, *example: torch.Tensor, mask_form: str | None = None):
    """``model``'s last hidden state as a frozen TorchScript trace, traced on ``example`` (ids, or ids and mask)."""
    return torch.jit.freeze(torch.jit.trace(_HiddenStates(model, mask_form).eval(), example, strict=False, check_trace=False))


class _PackedLinear(torch.nn.Module):
    """A linear layer whose weight is prepacked for oneDNN's fp32 kernel (the one torch.compile's freezing uses)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_linears(model: torch.nn.Module) -> None:
    """Replace every ``nn.Linear`` of ``model`` by a ``_PackedLinear``, in place, letting each dense weight go."""
    dropped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, name, _PackedLinear(child))
                dropped.append((child.weight.data_ptr(), child.weight.nbytes))
    release_mapped_pages(dropped)


def release_mapped_pages(ranges: list[tuple[int, int]]) -> None:
    """Let the kernel drop the pages of these (address, size) ranges where they map a file.

    transformers maps the weights file and its tensors point into the map, so
    pages of weights we no longer use stay resident while any other tensor
    keeps the map open. MADV_DONTNEED on a private file map only unloads
    pages (a later read would fetch them from the file again), so this is
    safe; anonymous memory and other systems are left alone.
    """
    if sys.platform != "linux" or not ranges:
        return
    import ctypes
    import mmap

    file_maps = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/") and fields[1].endswith("p"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                file_maps.append((start, end))
    libc = ctypes.CDLL(None, use_errno=True)
    for address, size in ranges:
        first = -(-address // mmap.PAGESIZE) * mmap.PAGESIZE
        last = (address + size) // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first and any(start <= first and last <= end for start, end in file_maps):
            libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # 4: MADV_DONTNEED


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


def flatten(token_ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(all ids in one array, where each text starts, each text's length)."""
    lengths = np.fromiter((len(ids) for ids in token_ids), dtype=np.int64, count=len(token_ids))
    flat = np.fromiter(itertools.chain.from_iterable(token_ids), dtype=np.int64, count=int(lengths.sum()))
    return flat, np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths


def length_batches(order: np.ndarray, lengths: np.ndarray, batch_size: int | None, batch_tokens: int | BatchBudget,
                   *, uniform: bool = False) -> Iterator[np.ndarray]:
    """Slices of ``order`` (indices sorted by length, longest first) of at most ``batch_size`` texts (None: no cap)
    and ``batch_tokens`` padded tokens (a ``BatchBudget`` is read again for every batch).

    With ``uniform``, a batch that would mix lengths ends where its first
    length does if that leaves it at least half full: a batch of one length
    needs no padding and no attention mask.
    """
    start = 0
    while start < len(order):
        width = int(lengths[order[start]])
        size = max(1, min(batch_size or len(order), int(batch_tokens) // max(width, 1)))
        end = min(start + size, len(order))
        if uniform:
            same = start + int(np.count_nonzero(lengths[order[start:end]] == width))  # longest first: a prefix
            end = same if 2 * (same - start) >= size else end
        yield order[start:end]
        start = end


class BatchBudget:
    """Padded tokens per forward pass: doubled from ``tokens`` up to ``limit`` while that measurably pays.

    Each budget is timed on the batches the encoder runs anyway (at least
    ``MEASURE_SECONDS`` of them); while real tokens per second improve by more
    than ``GAIN``, the budget doubles, else it goes back to the best one and
    stays. Small batches stay in the CPU's cache and suit a real model on a
    few cores; a tiny model or a GPU wants large ones. With ``limit`` equal to
    ``tokens`` (``batch_tokens`` given) it never changes.
    """

    MEASURE_SECONDS = 0.25
    GAIN = 1.05

    def __init__(self, tokens: int, *, limit: int):
        self.tokens, self.limit = tokens, max(limit, tokens)
        self.settled = self.tokens >= self.limit
        self._best: tuple[float, int] | None = None
        self._measured = [0, 0.0]

    def __int__(self) -> int:
        return self.tokens

    def record(self, tokens: int, seconds: float) -> None:
        """Note a forward pass of ``tokens`` real tokens that took ``seconds``."""
        if self.settled:
            return
        self._measured[0] += tokens
        self._measured[1] += seconds
        if self._measured[1] < self.MEASURE_SECONDS:
            return
        rate = self._measured[0] / self._measured[1]
        self._measured = [0, 0.0]
        if self._best is None or rate > self._best[0] * self.GAIN:
            self._best = (rate, self.tokens)
            if self.tokens * 2 <= self.limit:
                self.tokens *= 2
                return
        self.tokens, self.settled = self._best[1], True


# Model, torch, CPU and thread count (``_machine_key``) -> (forward chosen by _fastest_forward, threads for one
# query): in memory for this process, and in FORWARDS_FILE for the next ones (timing them costs seconds at load).
_CHOSEN: dict[str, tuple[str, int]] = {}
FORWARDS_FILE = "forwards.json"


def times_forwards(settings: IndexSettings, device: str | None = None) -> bool:
    """Whether loading the model ``settings`` describe will time its forwards (nothing remembered for this machine yet).

    Those timings want the cores to themselves: nothing else should run beside such a load.
    """
    if settings.precision != "fp32" or choose_device(device).type != "cpu":
        return False
    path = resolve_model_path(settings.model)
    key = _machine_key(path, file_stamp(path))
    return _known_choice(key) is None


def _known_choice(key: str) -> tuple[str, int] | None:
    """The forward and query threads chosen for ``key`` in this process, else remembered from an earlier one."""
    return _CHOSEN.get(key) or _remembered(key)


def _machine_key(path: str, stamp: tuple | None) -> str:
    """What the fastest forward depends on: the model's files, torch, the CPU and the thread count."""
    cpu = ""
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = "|".join(dict.fromkeys(line for line in lines if line.startswith(("model name", "flags"))))
    raw = json.dumps([path, stamp, torch.__version__, torch.get_num_threads(), cpu or platform.processor()])
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def _remembered(key: str) -> tuple[str, int] | None:
    """The choice remembered for ``key``; None if there is none or it is not ours."""
    choice = read_memo(FORWARDS_FILE).get(key)
    with contextlib.suppress(TypeError, ValueError):
        if isinstance(choice, list) and len(choice) == 2 and choice[0] in ("eager", "traced", "packed") and int(choice[1]) >= 1:
            return choice[0], int(choice[1])
    return None


# A single query is timed on at most this many threads (more only adds synchronisation for one short text).
QUERY_THREADS_MAX = 8


def _timed(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


@contextlib.contextmanager
def _thread_count(threads: int, restore: int):
    """Run on ``threads`` torch threads, then go back to ``restore`` unless another thread changed the count meanwhile."""
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() == threads:  # the count is process-wide: never undo another thread's change
            torch.set_num_threads(restore)


def _fastest_threads(run) -> int:
    """The number of torch threads (1, 2, 4, ... up to the current count and QUERY_THREADS_MAX) that runs ``run`` fastest."""
    current, timings = torch.get_num_threads(), {}
    for threads in (n for n in (1, 2, 4, 8, 16) if n <= min(current, QUERY_THREADS_MAX)):
        with _thread_count(threads, current):
            run()
            timings[threads] = min(_timed(run) for _ in range(5))
    return min(timings, key=timings.__getitem__, default=current)


def _quantized(model):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's dynamic quantisation warns that it is moving to torchao
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def _load_tokenizer(name: str, path: str):
    """The model's tokenizer and configuration (no model code is imported)."""
    from transformers import AutoConfig, AutoTokenizer

    with _loading(name):
        return AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path)


def _load_model(name: str, path: str):
    """The model's weights (importing its code: most of a load)."""
    from transformers import AutoModel

    with _loading(name):
        return AutoModel.from_pretrained(path)


@contextlib.contextmanager
def _loading(name: str):
    """transformers without its progress bars and warnings; its load errors as ModelError."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load model {name!r}: {first}") from None
