"""The ONNX Runtime backend: the model's forward exported once with torch, then run without torch or transformers.

``export`` (which needs torch) writes the model's last hidden state as
``model.onnx`` into ``$XDG_CACHE_HOME/indexer/onnx/<fingerprint>/`` (or
``~/.cache/...``), keyed by the model's fingerprint, so an export is only ever
taken for the weights and tokenizer it came from. ``OnnxEncoder`` tokenises
with ``tokenizers`` alone (``TextTokenizer(files_only=True)``), runs the
export, and pools and normalises with numpy, by the same formulas as the
torch backend (masked mean over the last hidden state, or ``[CLS]``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import ModelError
from ..models import cache_folder, canonical_model_name, resolve_model_path
from ..settings import IndexSettings, check_embedding
from .base import TokenEncoder
from .batching import BatchBudget, flatten, length_batches, padded
from .tokenizer import TextTokenizer

ONNX_FILE = "model.onnx"
# The export with its linear layers' weights in int8 (ONNX Runtime's dynamic quantisation), beside the fp32 one.
INT8_FILE = "model.int8.onnx"
PRECISIONS = ("fp32", "int8")
# Padded tokens per ONNX Runtime call: the torch backend's CPU starting budget.
BATCH_TOKENS = 1024


def export_path(fingerprint: str, precision: str = "fp32") -> Path:
    """Where the export of the model whose fingerprint is ``fingerprint`` lives, in ``precision``."""
    return cache_folder() / "onnx" / fingerprint / (INT8_FILE if precision == "int8" else ONNX_FILE)


# Where a model folder may ship its own fp32 export (sentence-transformers' ONNX layout first): used as it is.
SHIPPED = ("onnx/model.onnx", "model.onnx")


def shipped(model: str) -> Path | None:
    """The ONNX file ``model``'s own folder ships, if it does (then nothing is exported, and ``onnx`` is not needed)."""
    folder = Path(resolve_model_path(model))
    return next((folder / name for name in SHIPPED if (folder / name).is_file()), None) if folder.is_dir() else None


def available() -> bool:
    """Whether ONNX Runtime is installed (the ``onnx`` extra)."""
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def export(model: str, *, precision: str = "fp32", opset: int = 17) -> Path:
    """Export ``model``'s forward (ids, mask -> last hidden state) for ONNX Runtime, once per fingerprint and
    precision; its path. The fp32 file a model folder ships (``shipped``) is used instead. int8 quantises the fp32
    file's linear weights (dynamically: activations stay fp32) into the cache folder.

    Needs torch and transformers. The export takes the same attention-mask
    form as the torch backend's traced forward, so batch and width stay free.
    """
    if precision == "int8":
        return _quantised(export(model, opset=opset), export_path(fingerprint(model), "int8"))
    own = shipped(model)
    if own is not None:
        return own
    path = export_path(fingerprint(model))
    if path.is_file():
        return path
    import warnings

    import torch

    from .cpu_kernels import HiddenStates
    from .torch_backend import load_weights

    path.parent.mkdir(parents=True, exist_ok=True)
    text = TextTokenizer(model)
    weights = load_weights(text.model_name, text.path).eval()
    sdpa = getattr(weights.config, "_attn_implementation", None) == "sdpa"
    forward = HiddenStates(weights, "row" if sdpa else None).eval()
    ids = torch.tensor([[101, 2023, 2003, 102, 0, 0], [101, 2023, 2003, 1037, 2000, 102]])
    ids = ids.clamp(max=weights.config.vocab_size - 1)
    axes = {0: "batch", 1: "width"}
    partial = path.with_name(f".{ONNX_FILE}.{os.getpid()}.tmp")
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(forward, (ids, (ids != 0).long()), str(partial), input_names=["input_ids", "attention_mask"],
                              output_names=["last_hidden_state"], opset_version=opset, dynamo=False,
                              dynamic_axes={"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes})
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def fingerprint(model: str) -> str:
    """The fingerprint of ``model`` (remembered from an earlier load of its files as they are now, else loaded)."""
    from ..models import remembered_facts

    facts = remembered_facts(model)
    if facts is not None:
        return facts.fingerprint
    from .torch_backend import Encoder

    return Encoder(model, device="cpu").fingerprint


def from_settings(settings: IndexSettings, device: str | None = None) -> OnnxEncoder:
    """The ONNX encoder an index's settings describe, its model exported first if it never was (that needs torch)."""
    check_embedding(pooling=settings.pooling, precision=settings.precision, max_length=settings.max_length,
                    device_type=device.split(":")[0] if device else None, backend="onnx")
    path = export(settings.model, precision=settings.precision)
    return OnnxEncoder(settings.model, fingerprint(settings.model), pooling=settings.pooling,
                       max_length=settings.max_length, precision=settings.precision, path=path)


def query_path(model: str, fingerprint: str) -> Path | None:
    """The fp32 file a search can run for the model whose fingerprint is ``fingerprint``: its export, else the file
    its folder ships; None where there is neither."""
    path = export_path(fingerprint)
    return path if path.is_file() else shipped(model)


def _quantised(fp32: Path, path: Path) -> Path:
    """``fp32`` with its linear weights in int8, at ``path`` (made once)."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        import logging

        from onnxruntime.quantization import QuantType, quantize_dynamic

        partial = path.with_name(f".{INT8_FILE}.{os.getpid()}.tmp.onnx")
        root = logging.getLogger()
        level = root.level
        try:
            root.setLevel(logging.ERROR)  # its advice to pre-process the graph first, printed on every quantisation
            quantize_dynamic(str(fp32), str(partial), weight_type=QuantType.QInt8)
            os.replace(partial, path)
        finally:
            root.setLevel(level)
            partial.unlink(missing_ok=True)
    return path


class OnnxEncoder(TokenEncoder):
    """An encoder (see ``indexer.encoder``) that runs an ``export`` of the model with ONNX Runtime, fp32, on the CPU."""

    backend = "onnx"

    def __init__(self, model: str, fingerprint: str, *, pooling: str = "mean", max_length: int | None = None,
                 precision: str = "fp32", path: str | Path | None = None, threads: int | None = None):
        check_embedding(pooling=pooling, max_length=max_length, precision=precision, backend=self.backend)
        self.precision = precision
        try:
            import onnxruntime
        except ImportError:
            raise ModelError("the onnx backend needs onnxruntime: pip install 'indexer[onnx]'") from None
        path = Path(path) if path is not None else export_path(fingerprint, precision)
        if not path.is_file():
            raise ModelError(f"no ONNX export of model {canonical_model_name(model)!r} at {path}")
        self.model_name, self.fingerprint, self.pooling = canonical_model_name(model), fingerprint, pooling
        self.text = TextTokenizer(model, max_length, files_only=True)
        self.max_length, self.batch_size = self.text.max_length, None
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        # Our exports take ids and mask and give the last hidden state; a shipped file may also want token type ids
        # (all zero: one segment) and give its token vectors under sentence-transformers' name, beside others.
        self._types = "token_type_ids" in {i.name for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        self._output = next((n for n in ("last_hidden_state", "token_embeddings") if n in outputs), outputs[0])
        self._pad_id = self.text.tokenizer.pad_token_id or 0
        probe = np.full((1, 1), self._pad_id, dtype=np.int64)
        self.dimension = int(self._hidden(probe, np.ones_like(probe)).shape[-1])
        self.budget = BatchBudget(BATCH_TOKENS, limit=BATCH_TOKENS)

    def embed_tokens(self, token_ids: list[list[int]], progress: bool = False) -> np.ndarray:
        """Unit vectors of texts given as token ids, in batches of one padded width each."""
        flat, starts, lengths = flatten(token_ids)
        out = np.empty((len(lengths), self.dimension), dtype=np.float32)
        order = np.argsort(-lengths, kind="stable")
        for batch in length_batches(order, lengths, None, self.budget):
            ids, mask = padded(flat, starts[batch], lengths[batch], max(int(lengths[batch].max()), 1), self._pad_id)
            out[batch] = _unit(_pool(self._hidden(ids, mask), mask, self.pooling))
        return out

    def _hidden(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The token vectors ([texts, width, dimension]) of a padded batch."""
        feed = {"input_ids": ids, "attention_mask": mask, **({"token_type_ids": np.zeros_like(ids)} if self._types else {})}
        return self.session.run([self._output], feed)[0]


def _pool(hidden: np.ndarray, mask: np.ndarray, pooling: str) -> np.ndarray:
    """``pooling.mean_pool`` / ``cls_pool`` in numpy: the masked mean of the token vectors, or the first one's."""
    if pooling == "cls":
        return hidden[:, 0]
    weights = mask[:, :, None].astype(np.float32)
    return (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)
