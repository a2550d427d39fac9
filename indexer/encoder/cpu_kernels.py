"""How the torch backend runs on a CPU: the forward (eager, a frozen TorchScript trace, or oneDNN's prepacked
linear kernels) and the thread count for one query, chosen by timing once per model and machine and remembered;
dynamic int8 quantisation; pages of the weights file no longer used handed back."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import torch

from ..models import cache_folder, file_stamp, read_memo, resolve_model_path, write_memo
from ..settings import IndexSettings
from .device import choose_device


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


class HiddenStates(torch.nn.Module):
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
# per model files (``machine_key``) and form, and every encoder of those files in the process shares it. It is
# also saved (TRACES_FOLDER), so later processes load it (MiniLM: 0.06 s) instead of tracing it (about a second),
# and a search process runs it without transformers (``traced_backend``).
_TRACES: dict[str, torch.jit.ScriptModule | None] = {}
# Traces loaded from their files and not (yet) checked against the model here: what a search's stand-in runs.
_LOADED: dict[str, torch.jit.ScriptModule] = {}
TRACES_FOLDER = "traces"


def trace_path(key: str) -> Path:
    """Where the trace made for ``key`` (a ``machine_key``, ``|`` and the form) is saved."""
    return cache_folder() / TRACES_FOLDER / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.pt"


def shared_trace(key: str, trace, sound) -> torch.jit.ScriptModule | None:
    """The trace for ``key`` if it is ``sound`` (checked against the eager model): made in this process, else as an
    earlier one saved it, else made now by ``trace()`` and saved; None where the one made now is not sound."""
    if key not in _TRACES:
        saved = saved_trace(key)
        _LOADED.pop(key, None)  # checked now: kept below if sound, else let go
        if saved is not None and sound(saved):
            _TRACES[key] = saved
        else:
            made = trace()
            _TRACES[key] = _save(key, made) if sound(made) else None
    elif _TRACES[key] is not None and not trace_path(key).is_file():  # the cache folder was emptied, or is another now
        _save(key, _TRACES[key])
    return _TRACES[key]


def saved_trace(key: str) -> torch.jit.ScriptModule | None:
    """The trace for ``key`` this process made or checked, else as an earlier one saved it (unchecked: a cache file
    can be damaged, so whoever runs it checks its vectors first); None if there is none that loads."""
    if key in _TRACES:
        return _TRACES[key]
    if key not in _LOADED:
        path = trace_path(key)
        if not path.is_file():
            return None
        try:
            _LOADED[key] = torch.jit.load(str(path), map_location="cpu")
        except Exception:  # damaged (the key holds torch's version): made and saved again by the next load of the model
            path.unlink(missing_ok=True)
            return None
    return _LOADED[key]


def _save(key: str, trace: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """Save ``trace`` for ``key`` whole or not at all (a file that cannot be written is skipped)."""
    with contextlib.suppress(OSError, RuntimeError):
        path = trace_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            torch.jit.save(trace, str(partial))
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
    return trace


def frozen_trace(model: torch.nn.Module, *example: torch.Tensor, mask_form: str | None = None):
    """``model``'s last hidden state as a frozen TorchScript trace, traced on ``example`` (ids, or ids and mask)."""
    return torch.jit.freeze(torch.jit.trace(HiddenStates(model, mask_form).eval(), example, strict=False, check_trace=False))


class PackedLinear(torch.nn.Module):
    """A linear layer whose weight is prepacked for oneDNN's fp32 kernel (the one torch.compile's freezing uses)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_linears(model: torch.nn.Module) -> None:
    """Replace every ``nn.Linear`` of ``model`` by a ``PackedLinear``, in place, letting each dense weight go."""
    dropped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, name, PackedLinear(child))
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


# Model, torch, CPU and thread count (``machine_key``) -> (forward chosen by _fastest_forward, threads for one
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
    key = machine_key(path, file_stamp(path))
    return known_choice(key) is None


def known_choice(key: str) -> tuple[str, int] | None:
    """The forward and query threads chosen for ``key`` in this process, else remembered from an earlier one."""
    return _CHOSEN.get(key) or _remembered(key)


def machine_key(path: str, stamp: tuple | None) -> str:
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


def timed(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


@contextlib.contextmanager
def thread_count(threads: int, restore: int):
    """Run on ``threads`` torch threads, then go back to ``restore`` unless another thread changed the count meanwhile."""
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() == threads:  # the count is process-wide: never undo another thread's change
            torch.set_num_threads(restore)


def fastest_threads(run) -> int:
    """The number of torch threads (1, 2, 4, ... up to the current count and QUERY_THREADS_MAX) that runs ``run`` fastest."""
    current, timings = torch.get_num_threads(), {}
    for threads in (n for n in (1, 2, 4, 8, 16) if n <= min(current, QUERY_THREADS_MAX)):
        with thread_count(threads, current):
            run()
            timings[threads] = min(timed(run) for _ in range(5))
    return min(timings, key=timings.__getitem__, default=current)


def quantized(model):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's dynamic quantisation warns that it is moving to torchao
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def remember_choice(key: str, forward: str, query_threads: int) -> None:
    """Remember the forward and query threads chosen for ``key``, in this process and for the next ones."""
    if _CHOSEN.get(key) != (forward, query_threads):
        _CHOSEN[key] = (forward, query_threads)
        write_memo(FORWARDS_FILE, key, [forward, query_threads])
