"""One hierarchy for every error a user can cause or fix.

Library callers catch :class:`IndexerError`. Each class carries what it
becomes at the edges, defined here and only here: ``exit_code`` for the CLI
(which prints a one-line message) and ``http_status`` for the server. A
subclass that sets neither inherits its parent's.
"""

import errno

# What the OS says when the disk or the quota runs out (see DiskFullError).
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class IndexerError(Exception):
    """Base class: a problem with the user's input, model or index, not a bug."""

    exit_code = 1
    http_status = 400


class SourceError(IndexerError):
    """A document source is unreadable or malformed (names the file and line)."""

    exit_code = 3


class ModelError(IndexerError):
    """A model cannot be loaded, or does not match the index it is used with."""

    exit_code = 4


class IndexNotFoundError(IndexerError):
    """No index, or no published version, at the given path."""

    exit_code = 5
    http_status = 404


class IndexCorruptError(IndexerError):
    """An index version is damaged: files missing or inconsistent."""

    exit_code = 6
    http_status = 503


class IndexLockedError(IndexerError):
    """Another writer holds the index's lock."""

    exit_code = 7
    http_status = 409


class ArgumentError(IndexerError):
    """An option or argument value is out of range."""

    exit_code = 2


class DocumentNotFoundError(ArgumentError):
    """No document with the given id (an argument that names nothing, so ``except ArgumentError`` still catches it)."""

    exit_code = 2
    http_status = 404


class ShardUnavailableError(IndexerError):
    """A shard of a sharded service did not answer (its replicas are starting or gone); asking again may succeed."""

    exit_code = 9
    http_status = 503


class DiskFullError(IndexerError):
    """The disk (or quota) ran out while writing; nothing was published."""

    exit_code = 8
    http_status = 507
