"""Short batches (queries) on CUDA replayed from CUDA graphs: one launch instead of a hundred small kernels."""

from __future__ import annotations

import threading

import torch

from .batching import QUERY_TEXTS

GRAPH_MAX_SHAPES = 64


class CudaGraphs:
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
