"""Questions on the torch backend without transformers: the model's forward as the TorchScript trace an earlier load
saved on this machine (``cpu_kernels.shared_trace``), run by torch alone, tokenised by ``tokenizers``.

A full load imports transformers and builds the model (2-3 s for MiniLM on a
2-core machine); loading the saved trace takes 0.06 s. Only searches use it,
once its vectors agree with the index's own (``external.load_query_encoder``);
writes load the model itself, whose fingerprint they check.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from ..models import canonical_model_name, file_stamp, resolve_model_path
from ..settings import IndexSettings
from .base import TokenEncoder
from .batching import QUERY_TEXTS, BatchBudget, flatten, length_batches, padded
from .cpu_kernels import known_choice, machine_key, saved_trace, thread_count, trace_path
from .pooling import POOLERS
from .tokenizer import TextTokenizer

# Padded tokens per forward: the torch backend's CPU starting budget (a search embeds a few texts at a time).
BATCH_TOKENS = 1024
PAD_MULTIPLE = 8
# The attention-mask forms a CPU trace is made in (``cpu_kernels.model_mask``): SDPA's row mask, or the model's own.
MASK_FORMS = ("row", None)


def from_saved(settings: IndexSettings, fingerprint: str) -> tuple[TracedEncoder, Path] | None:
    """The encoder of ``settings`` (torch, fp32, CPU) from the trace saved for the model's files as they are now, with
    the query threads remembered for this machine, and the trace's file; None where there is none (then load the model)."""
    if settings.precision != "fp32":  # either backend: the caller checks the trace agrees with the index's vectors
        return None
    model_path = resolve_model_path(settings.model)
    key = machine_key(model_path, file_stamp(model_path))
    choice = known_choice(key)
    if choice is None:  # decided before anything is loaded: then the model itself is
        return None
    for form in MASK_FORMS:
        path = trace_path(f"{key}|{form}")
        trace = saved_trace(f"{key}|{form}") if path.is_file() else None
        if trace is not None:
            text = TextTokenizer(settings.model, settings.max_length, files_only=True)
            return TracedEncoder(settings, fingerprint, trace, text=text, query_threads=choice[1]), path
    return None


class TracedEncoder(TokenEncoder):
    """An encoder (see ``indexer.encoder``) that embeds with a saved TorchScript trace of the model's forward, fp32, on the CPU.

    ``fingerprint``: the index's, which this encoder does not compute (it has
    no weights to hash); it is trusted only once its vectors agree with the index's.
    """

    backend = "torch"
    precision = "fp32"
    batch_size = None

    def __init__(self, settings: IndexSettings, fingerprint: str, trace: torch.jit.ScriptModule, *, text: TextTokenizer,
                 query_threads: int | None = None):
        self.model_name, self.fingerprint, self.pooling = canonical_model_name(settings.model), fingerprint, settings.pooling
        self.text, self.max_length = text, text.max_length
        self.query_threads = query_threads
        self._trace, self._pool = trace, POOLERS[settings.pooling]
        self._pad_id = text.tokenizer.pad_token_id or 0
        self.budget = BatchBudget(BATCH_TOKENS, limit=BATCH_TOKENS)
        with torch.inference_mode():
            self.dimension = int(trace(torch.tensor([[self._pad_id]]), torch.ones(1, 1, dtype=torch.long)).shape[-1])

    def embed_tokens(self, token_ids: list[list[int]], progress: bool = False) -> np.ndarray:
        """Unit vectors of texts given as token ids, in batches of one padded width each."""
        flat, starts, lengths = flatten(token_ids)
        out = np.empty((len(lengths), self.dimension), dtype=np.float32)
        order = np.argsort(-lengths, kind="stable")
        with torch.inference_mode(), self._threads(len(lengths)):
            for batch in length_batches(order, lengths, None, self.budget):
                # Widths a multiple of PAD_MULTIPLE, as the torch backend pads (oneDNN compiles kernels per width).
                longest = max(int(lengths[batch].max()), 1)
                width = min(-(-longest // PAD_MULTIPLE) * PAD_MULTIPLE, max(self.max_length, longest))
                ids, mask = (torch.from_numpy(a) for a in padded(flat, starts[batch], lengths[batch], width, self._pad_id))
                pooled = self._pool(self._trace(ids, mask).float(), mask)
                out[batch] = torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()
        return out

    def _threads(self, texts: int):
        """A question (at most ``QUERY_TEXTS`` texts) runs on the thread count remembered as its fastest."""
        current = torch.get_num_threads()
        if self.query_threads is None or texts > QUERY_TEXTS or self.query_threads == current:
            return contextlib.nullcontext()
        return thread_count(self.query_threads, current)
