"""Integrity checks of published versions: manifests, deletion sets, every segment's files, checksums, counts and keys."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import layout
from .errors import IndexCorruptError, IndexerError
from .segments import Segment
from .snapshot import read_deleted


def check_version(path: Path, version: str, checked: dict[str, list[str]] | None = None) -> list[str]:
    """Every fault found in one version of the index at ``path``; empty when it is sound.

    ``checked`` remembers segments already checked (by name), so checking
    every version reads each shared segment once.
    """
    checked = {} if checked is None else checked
    folder = layout.version_dir(path, version)
    try:
        manifest = layout.read_manifest(folder)
    except IndexerError as exc:
        return [str(exc)]
    if manifest.legacy:
        names = sorted({layout.DOCUMENTS, layout.VECTORS, *manifest.files})
        problems = [f"{version}: {p}" for p in layout.damaged_files(folder, manifest, names)]
        return problems or [f"{version}: {p}" for p in check_segment(folder, legacy=manifest)]
    problems = [f"{version}: {p}" for p in layout.damaged_files(folder, manifest, sorted({layout.DELETED, *manifest.files}))]
    if problems:
        return problems
    try:
        deleted = read_deleted(folder)
    except IndexCorruptError as exc:
        return [f"{version}: {exc}"]
    held, counts = [], 0
    for name in manifest.segments:
        segment_folder = layout.segment_dir(path, name)
        if name not in checked:
            checked[name] = check_segment(segment_folder)
        problems += [f"{version}: {p}" for p in checked[name]]
        if not checked[name]:
            held.append(np.load(segment_folder / layout.KEYS))
            counts += len(held[-1])
    if problems:
        return problems
    keys = np.concatenate(held) if held else np.empty(0, dtype=np.int64)
    if len(np.unique(keys)) != len(keys):
        problems.append(f"{version}: two segments hold the same key")
    if len(deleted) != manifest.deleted or np.any(np.diff(deleted) <= 0):
        problems.append(f"{version}: deletion set holds {len(deleted)} keys (manifest says {manifest.deleted}) or is not sorted")
    strays = np.setdiff1d(deleted, keys)
    if len(strays):
        problems.append(f"{version}: {len(strays)} deleted keys no segment holds ({strays[:5].tolist()} ...)")
    if counts - len(deleted) != manifest.count:
        problems.append(f"{version}: {counts} documents in segments, {len(deleted)} deleted, manifest says {manifest.count} live")
    return problems


def check_segment(folder: Path, legacy: layout.Manifest | None = None) -> list[str]:
    """Every fault found in one segment (or a format-1 version folder, with its manifest as ``legacy``)."""
    if legacy is None:
        try:
            meta = layout.read_segment_meta(folder)
        except IndexerError as exc:
            return [str(exc)]
        problems = layout.segment_problems(folder, meta, checksums=True)
        if problems:
            return problems
    try:
        segment = Segment.open(folder, legacy=legacy)
    except IndexerError as exc:
        return [str(exc)]
    name = folder.name
    problems = []
    try:
        vectors, meta = segment.vectors, segment.meta
        rows = segment.store.count()
        if not len(vectors) == rows == meta.count == len(segment.keys):
            problems.append(f"{name}: {len(vectors)} vectors, {rows} rows, {len(segment.keys)} keys, described as {meta.count}")
        if vectors.dimension != meta.dimension:
            problems.append(f"{name}: vectors have {vectors.dimension} dimensions, described as {meta.dimension}")
        vector_keys = np.sort(vectors.keys())
        row_keys = segment.store.keys()
        if not np.array_equal(row_keys, segment.keys):
            problems.append(f"{name}: its key file does not list its documents' keys")
        if len(row_keys) and row_keys[0] < meta.base:
            problems.append(f"{name}: keys below its base {meta.base}")
        orphans = np.setdiff1d(vector_keys, row_keys)
        if len(orphans):
            problems.append(f"{name}: {len(orphans)} vectors without a row (FAISS ids {orphans[:5].tolist()} ...)")
        unindexed = np.setdiff1d(row_keys, vector_keys)
        if len(unindexed):
            problems.append(f"{name}: {len(unindexed)} rows without a vector (keys {unindexed[:5].tolist()} ...)")
        if len(np.unique(vector_keys)) != len(vector_keys):
            problems.append(f"{name}: duplicate FAISS ids")
    finally:
        segment.close()
    return problems


def check_index(index: str | Path, all_versions: bool = False) -> dict:
    """Check the current version (or every version on disk) of an index, with every segment it lists.

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
    checked: dict[str, list[str]] = {}
    problems += [p for version in versions for p in check_version(path, version, checked)]
    return {"index": str(path), "current": current, "checked": versions, "problems": problems}
