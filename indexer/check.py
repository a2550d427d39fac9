"""Integrity checks of published versions: files, checksums, counts, FAISS ids against SQLite keys."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import layout
from .errors import IndexCorruptError, IndexerError
from .store import DocumentStore
from .vectors import VectorIndex


def check_version(path: Path, version: str) -> list[str]:
    """Every fault found in one version of the index at ``path``; empty when it is sound."""
    folder = layout.version_dir(path, version)
    try:
        manifest = layout.read_manifest(folder)
    except IndexerError as exc:
        return [str(exc)]
    names = {layout.DOCUMENTS, layout.VECTORS, *manifest.files}
    problems = [f"{version}: {problem}" for problem in layout.damaged_files(folder, manifest, sorted(names))]
    if problems:
        return problems
    try:
        vectors = VectorIndex.load(folder / layout.VECTORS)
        store = DocumentStore.open_readonly(folder / layout.DOCUMENTS)
    except IndexerError as exc:
        return [f"{version}: {exc}"]
    try:
        rows = store.count()
        if not len(vectors) == rows == manifest.count:
            problems.append(f"{version}: {len(vectors)} vectors, {rows} rows, manifest says {manifest.count}")
        if vectors.dimension != manifest.dimension:
            problems.append(f"{version}: vectors have {vectors.dimension} dimensions, manifest says {manifest.dimension}")
        vector_keys = np.sort(vectors.keys())
        row_keys = np.asarray(store.keys(), dtype=np.int64)
        orphans = np.setdiff1d(vector_keys, row_keys)
        if len(orphans):
            problems.append(f"{version}: {len(orphans)} vectors without a row (FAISS ids {orphans[:5].tolist()} ...)")
        unindexed = np.setdiff1d(row_keys, vector_keys)
        if len(unindexed):
            problems.append(f"{version}: {len(unindexed)} rows without a vector (keys {unindexed[:5].tolist()} ...)")
        if len(np.unique(vector_keys)) != len(vector_keys):
            problems.append(f"{version}: duplicate FAISS ids")
    finally:
        store.close()
    return problems


def check_index(index: str | Path, all_versions: bool = False) -> dict:
    """Check the current version (or every version on disk) of an index.

    Returns ``{"index", "current", "checked": [...], "problems": [...]}``; the
    index is sound when ``problems`` is empty. A ``CURRENT`` that points to a
    missing version is a problem, not an exception, so ``all_versions`` still
    reports which versions on disk are sound enough to roll back to.
    """
    path = layout.index_path(index)
    problems = []
    try:
        current = layout.current_version(path)
    except IndexCorruptError as exc:
        current, problems = layout.read_pointer(path), [str(exc)]
    if all_versions:
        versions = layout.list_versions(path)
    else:
        versions = [current] if not problems else []
    problems += [p for version in versions for p in check_version(path, version)]
    return {"index": str(path), "current": current, "checked": versions, "problems": problems}
