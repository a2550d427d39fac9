"""One hierarchy for every error a user can cause or fix.

Library callers catch :class:`IndexerError`; the CLI turns each subclass into
a one-line message and its own exit code (see ``indexer.cli.EXIT_CODES``).
"""

import errno

# What the OS says when the disk or the quota runs out (see DiskFullError).
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class IndexerError(Exception):
    """Base class: a problem with the user's input, model or index, not a bug."""


class SourceError(IndexerError):
    """A document source is unreadable or malformed (names the file and line)."""


class ModelError(IndexerError):
    """A model cannot be loaded, or does not match the index it is used with."""


class IndexNotFoundError(IndexerError):
    """No index, or no published version, at the given path."""


class IndexCorruptError(IndexerError):
    """An index version is damaged: files missing or inconsistent."""


class IndexLockedError(IndexerError):
    """Another writer holds the index's lock."""


class ArgumentError(IndexerError):
    """An option or argument value is out of range."""


class DiskFullError(IndexerError):
    """The disk (or quota) ran out while writing; nothing was published."""
