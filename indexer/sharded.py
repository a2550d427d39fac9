"""Serving one index from shards on Ray Serve (``indexer serve --engine ray --shards N``).

The vectors, what a search process spends its memory on, are spread over N
shard deployments of Ray Serve, R replicas each: each shard holds a disjoint
set of the served version's segments, balanced by size (``place``). The
ingress is the ``indexer serve`` process itself, with the same HTTP API,
page, keys, limits and metrics: it embeds a question once, asks every shard
for its top k (each excludes the version's deleted documents and keeps only
the keys a filter allowed, so k hits come back while k live documents
match) and merges them by score, ties by key, as one process merges its
segments (``snapshot.merge_hits``). Keyword search runs in the shards
too, with the index-wide statistics: the live documents and tokens (the
ingress knows them) and each term's document frequency (asked of the
shards first), so a shard's BM25 scores are the whole index's; hybrid fuses
the merged lists. Filters and documents the ingress reads from the index's
files on the shared path (SQLite), as one process does; each shard gets the
keys a filter allowed among its own.

Every call to a shard names the version and the segments to search; a
replica opens what it does not hold yet from the shared path and keeps the
``SHARD_VERSIONS`` latest versions, so a query is answered from one version
on every shard, a replica that Ray Serve starts in place of a dead one
serves at once, and the ingress switches to a new version only after every
shard has opened it (``ShardPool.open``).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ArgumentError, IndexerError, ShardUnavailableError
from .snapshot import Snapshot, bm25, frequencies, merge_hits, query_terms

SHARD_VERSIONS = 2  # versions a replica keeps open: the one served and the one being switched to

def place(sizes: dict[str, int], shards: int, previous: dict[str, int] | None = None) -> dict[str, int]:
    """The shard of each segment (``sizes``: documents by segment name).

    Segments placed before (``previous``) stay where they are, so a write
    makes shards open only its new segment; new ones go, largest first, to
    the shard with the least data. Where that leaves two shards further
    apart than the largest segment (what placing them all afresh, largest
    first, guarantees: after merges), every segment is placed afresh.
    """
    loads = [0] * shards
    placed: dict[str, int] = {}
    for name, shard in (previous or {}).items():
        if name in sizes and 0 <= shard < shards:
            placed[name] = shard
            loads[shard] += sizes[name]
    for name in sorted((n for n in sizes if n not in placed), key=lambda n: (-sizes[n], n)):
        placed[name] = loads.index(min(loads))
        loads[placed[name]] += sizes[name]
    if previous and sizes and max(loads) - min(loads) > max(sizes.values()):
        return place(sizes, shards)
    return placed


class ShardSnapshot:
    """What one shard replica holds: its segments of the latest versions, opened on first use (the deployment's body)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._versions: OrderedDict[str, Snapshot] = OrderedDict()
        self._lock = threading.Lock()

    def _snapshot(self, version: str, names: Sequence[str]) -> Snapshot:
        with self._lock:
            if version not in self._versions:
                loaded = {s.meta.uid: s for snapshot in self._versions.values() for s in snapshot.segments}
                self._versions[version] = Snapshot.open(self.path, version, loaded=loaded, only=set(names))
                while len(self._versions) > SHARD_VERSIONS:
                    _, old = self._versions.popitem(last=False)
                    old.close(keep={s.meta.uid: s for snapshot in self._versions.values() for s in snapshot.segments})
            self._versions.move_to_end(version)
            return self._versions[version]

    def prepare(self, version: str, names: list[str]) -> int:
        """Open ``names`` of ``version``; the live documents they hold."""
        return len(self._snapshot(version, names))

    def dense(self, version: str, names: list[str], embedded: np.ndarray, k: int, allowed: np.ndarray | None,
              knobs: dict[str, int | None]) -> list[tuple[list[int], list[float]]]:
        """``Snapshot.dense`` over this shard's segments of ``version``."""
        return self._snapshot(version, names).dense(embedded, k, allowed, knobs)

    def frequencies(self, version: str, names: list[str], terms: list[str]) -> dict[str, int]:
        """Each term's document frequency among this shard's live documents of ``version``."""
        return frequencies(self._snapshot(version, names).postings(terms))

    def keyword(self, version: str, names: list[str], terms: list[str], frequency: dict[str, int], live: int, tokens: int,
                k: int, allowed: np.ndarray | None) -> tuple[list[int], list[float]]:
        """This shard's top-``k`` by BM25 with the whole version's statistics (``snapshot.bm25``)."""
        return bm25(self._snapshot(version, names).postings(terms), frequency, live, tokens, k, allowed)

    def pid(self) -> int:
        return os.getpid()


class ShardedSnapshot(Snapshot):
    """A version opened without vectors by the ingress, whose dense and keyword searches ask the shards of ``pool``."""

    def __init__(self, opened: Snapshot, pool: ShardPool, placement: dict[str, int]):
        super().__init__(opened.path, opened.manifest, opened.segments, opened.deleted)
        self.pool, self.placement = pool, placement

    def _asked(self, allowed: np.ndarray | None) -> list[tuple[int, list[str], np.ndarray | None]]:
        """(shard, its segments, the allowed keys among theirs) of each shard with something to search."""
        asked = []
        for shard in range(self.pool.shards):
            mine = [s for s in self.segments if self.placement.get(s.name) == shard]
            part = None
            if allowed is not None:
                part = allowed[np.any([s.holds(allowed) for s in mine], axis=0)] if mine else allowed[:0]
            if mine and (part is None or len(part)):
                asked.append((shard, [s.name for s in mine], part))
        return asked

    def _ask(self, asked, method: str, *before: Any, after=lambda part: ()) -> list[Any]:
        """Every shard's answer to ``method(version, its segments, *before, *after(its allowed keys))``, asked at once."""
        calls = [self.pool.call(shard, method, self.version, names, *before, *after(part)) for shard, names, part in asked]
        return [self.pool.result(call) for call in calls]

    def dense(self, embedded: np.ndarray, k: int, allowed: np.ndarray | None,
              knobs: dict[str, int | None]) -> list[tuple[list[int], list[float]]]:
        answers = self._ask(self._asked(allowed), "dense", embedded, k, after=lambda part: (part, knobs))
        rows = []
        for query in range(len(embedded)):
            keys = [key for answer in answers for key in answer[query][0]]
            scores = [score for answer in answers for score in answer[query][1]]
            rows.append(merge_hits(np.array([scores], dtype=np.float64), np.array([keys], dtype=np.int64), k)[0])
        return rows

    def keyword(self, query: str, k: int, allowed: np.ndarray | None = None) -> tuple[list[int], list[float]]:
        """BM25 in the shards, with the whole version's statistics: its live documents and tokens (known here), and each
        term's document frequency (summed over the shards first)."""
        terms = query_terms(query)
        if not terms or not len(self):
            return [], []
        counted = self._ask(self._asked(None), "frequencies", terms)
        frequency = {term: sum(counts.get(term, 0) for counts in counted) for term in terms}
        answers = self._ask(self._asked(allowed), "keyword", terms, frequency, len(self), self.tokens, k,
                            after=lambda part: (part,))
        keys = np.array([key for found, _ in answers for key in found], dtype=np.int64)
        scores = np.array([score for _, found in answers for score in found], dtype=np.float64)
        order = np.lexsort((keys, -scores))[:k]
        return keys[order].tolist(), scores[order].tolist()

    def stored_sample(self, count: int) -> None:
        return None  # the vectors are in the shards


class ShardPool:
    """N shard deployments on Ray Serve (``R`` replicas each) for the index at ``path``; ``prepare`` opens a version on
    all of them, ``call`` asks one."""

    def __init__(self, path: str | Path, *, shards: int, replicas: int = 1, address: str | None = None):
        if shards < 1 or replicas < 1:
            raise ArgumentError(f"--shards and --replicas must be at least 1, got {shards} and {replicas}")
        import ray
        from ray import serve

        self.path, self.shards, self.replicas = Path(path).resolve(), shards, replicas
        self._started_ray = not ray.is_initialized()
        if self._started_ray:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        serve.start(proxy_location="Disabled")  # the ingress is our own server; Serve's HTTP proxy would take its port
        deployment = serve.deployment(ShardSnapshot, ray_actor_options={"num_cpus": 0})
        self.name = f"indexer-{abs(hash(str(self.path))):x}"
        self._handles = [serve.run(deployment.options(name=f"shard{i}", num_replicas=replicas).bind(str(self.path)),
                                   name=f"{self.name}-shard{i}", route_prefix=None)
                         for i in range(shards)]
        self.placement: dict[str, int] = {}

    def call(self, shard: int, method: str, *args: Any):
        return getattr(self._handles[shard], method).remote(*args)

    def result(self, response) -> Any:
        try:
            return response.result(timeout_s=120)
        except IndexerError:
            raise
        except Exception as exc:  # a replica died or is not up yet: the question may be asked again
            raise ShardUnavailableError(f"a shard did not answer ({type(exc).__name__}); try again") from None

    def open(self, opened: Snapshot) -> ShardedSnapshot:
        """``opened`` (a version without vectors) as a sharded snapshot, once every shard has opened its segments."""
        placement = place({s.name: s.meta.count for s in opened.segments}, self.shards, self.placement)
        names = [[name for name, shard in placement.items() if shard == i] for i in range(self.shards)]
        for response in [self.call(i, "prepare", opened.version, names[i]) for i in range(self.shards)]:
            self.result(response)
        self.placement = placement
        return ShardedSnapshot(opened, self, placement)

    def close(self) -> None:
        import ray
        from ray import serve

        for i in range(self.shards):
            serve.delete(f"{self.name}-shard{i}")
        if self._started_ray:
            serve.shutdown()
            ray.shutdown()
