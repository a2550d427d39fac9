"""The torch backend: text -> unit vectors with a BERT-family model through transformers and torch.

Texts are tokenised once, sorted by token length and batched, so each batch
pads only to its own longest text; vectors come back in input order. On a CPU
the forward and a query's thread count are chosen by timing (``cpu_kernels``);
on CUDA queries replay CUDA graphs (``cuda_graphs``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from tqdm import tqdm

from .. import interrupts
from ..errors import ModelError
from ..models import ModelFacts, canonical_model_name, embeds_as, file_stamp, remember_facts
from ..settings import DEFAULT_MODEL, Embedding, IndexSettings, check_embedding
from .batching import QUERY_TEXTS, BatchBudget, flatten, length_batches, padded
from .cpu_kernels import (
    HiddenStates,
    PackedLinear,
    fastest_threads,
    frozen_trace,
    known_choice,
    machine_key,
    model_mask,
    pack_linears,
    quantized,
    remember_choice,
    shared_trace,
    thread_count,
    timed,
    trace_path,
)
from .cuda_graphs import CudaGraphs
from .device import HALF_DTYPES, choose_device
from .pooling import POOLERS
from .tokenizer import TextTokenizer, loading

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
# On an accelerator, encode_texts tokenises inputs longer than this in parts, the next while the model runs.
TOKENIZE_AHEAD = 8192


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

    backend = "torch"

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
        # Through transformers, not tokenizers alone: the fingerprint hashes transformers' view of the tokenizer, which
        # every index records. Searches load it through tokenizers (onnx_backend, traced_backend).
        self.text = tokenizer or TextTokenizer(model, max_length)
        self.tokenizer, self.max_length = self.text.tokenizer, self.text.max_length
        path = self._path = self.text.path
        self._stamp = self.text.stamp
        self._weights = load_weights(self.model_name, path)
        self._weights.to(self.device).eval()
        # On a GPU the half precisions run a half model (no per-op casts, the same fast path as fp32); on CPU
        # bf16 stays autocast, which keeps layer norms and softmax in fp32. The fingerprint reads the files again.
        self._cast = self.device.type == "cuda" and precision in HALF_DTYPES
        if self._cast:
            self._weights.to(HALF_DTYPES[precision])
        self.model = quantized(self._weights) if precision == "int8" else self._weights
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
        self._embed = CudaGraphs(self._unit_vectors) if self.device.type == "cuda" else self._unit_vectors

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
        if self._cast or any(isinstance(m, PackedLinear) for m in weights.modules()):
            if file_stamp(self._path) != self._stamp:
                raise ModelError(f"the files of model {self.model_name!r} changed since it was loaded; restart")
            weights = load_weights(self.model_name, self._path)
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
    def embedding(self) -> Embedding:
        """Everything besides the text that decides a vector (a write's: it reads the fingerprint)."""
        return Embedding(self.fingerprint, self.pooling, self.max_length, self.precision, self.backend)

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

        with thread_count(1, torch.get_num_threads()), ThreadPoolExecutor(self.workers, thread_name_prefix="encode") as pool:
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
            return min(timed(lambda: (forward(*query), forward(*work))) for _ in range(runs))

        key = machine_key(self._path, self._stamp)
        chosen, self.query_threads = known_choice(key) or (None, None)
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
            # Traced while choosing, and where the packed model was chosen and no trace is saved (any more): a search
            # process runs the saved trace without transformers (``traced_backend``). A remembered eager choice is not
            # traced again: the trace was saved when it was chosen, or the tracer could not handle the model.
            trace_key = f"{key}|{self._mask_form}"
            if chosen in (None, "traced") or (chosen == "packed" and not trace_path(trace_key).is_file()):
                try:
                    traced = shared_trace(trace_key, lambda: frozen_trace(self.model, *example, mask_form=self._mask_form), matches)
                    if traced is not None and chosen in (None, "traced"):
                        timings["traced"] = seconds(traced) if chosen is None else 0.0
                except Exception:  # any model the tracer cannot handle runs another way
                    pass
            if chosen in (None, "packed") and torch.backends.mkldnn.is_available():
                try:
                    pack_linears(self.model)
                    packed = HiddenStates(self.model, self._mask_form)
                    if matches(packed):
                        timings["packed"] = seconds(packed) if chosen is None else 0.0
                except Exception:  # a model or torch build without these kernels runs another way
                    pass
            chosen = min(timings, key=timings.__getitem__) if timings else "eager"
            if chosen != "packed" and any(isinstance(m, PackedLinear) for m in self.model.modules()):
                self._weights = load_weights(self.model_name, self._path)
                self.model = self._weights.eval()
            forward = {"packed": lambda: HiddenStates(self.model, self._mask_form), "traced": lambda: traced}.get(chosen, lambda: self._eager_forward)()
            if self.query_threads is None:
                self.query_threads = fastest_threads(lambda: forward(*query))
            unmasked = {"packed": lambda: None, "traced": lambda: self._traced_unmasked(key)}.get(chosen, lambda: self._eager_unmasked)()
        remember_choice(key, chosen, self.query_threads)
        return forward, unmasked

    def _traced_unmasked(self, key: str):
        """The model traced without attention mask, if it matches eager's within 1e-5 (else eager's)."""
        example, check = torch.tensor(self.tokenize(["two words"] * 2)), torch.tensor(self.tokenize(["a check text of one length"] * 3))
        try:
            traced = shared_trace(f"{key}|unmasked", lambda: frozen_trace(self.model, example),
                                  lambda trace: (trace(check) - self._eager_unmasked(check)).abs().max().item() <= 1e-5)
        except Exception:  # a model the tracer cannot handle runs eager
            traced = None
        return traced if traced is not None else self._eager_unmasked

    def _threads(self, texts: int):
        """On CPU, a query (at most ``QUERY_TEXTS`` texts) runs on ``query_threads``; the count is restored after it."""
        current = torch.get_num_threads()
        if self.query_threads is None or texts > QUERY_TEXTS or self.query_threads == current:
            return contextlib.nullcontext()
        return thread_count(self.query_threads, current)

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
        input_ids, attention_mask = padded(flat, starts, lengths, width, self._pad_id)
        if self.device.type == "cuda":  # from page-locked memory, so the copy runs behind the host's next batch
            return (torch.from_numpy(input_ids).pin_memory().to(self.device, non_blocking=True),
                    torch.from_numpy(attention_mask).pin_memory().to(self.device, non_blocking=True))
        return torch.from_numpy(input_ids).to(self.device), torch.from_numpy(attention_mask).to(self.device)


def load_weights(name: str, path: str):
    """The model's weights (importing its code: most of a load)."""
    from transformers import AutoModel

    with loading(name):
        return AutoModel.from_pretrained(path)
