"""Errors that cross the wire.

Every error a caller can cause is a :class:`ColabelError` subclass whose message names the problem in one
sentence; hypha-rpc carries the message to the remote caller. Nothing is written when one is raised.
"""

from __future__ import annotations


class ColabelError(Exception):
    """Base class of every error colabel raises on purpose."""


class NotFoundError(ColabelError, KeyError):
    """An id (image, session, annotator, version, token) that does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InvalidInputError(ColabelError, ValueError):
    """Malformed input: wrong type, bad geometry, bad region, bad name."""


class PayloadTooLargeError(InvalidInputError):
    """A payload above the configured size limit."""


class AccessDeniedError(ColabelError, PermissionError):
    """A token that is unknown, revoked, or not allowed to do this."""


class SessionClosedError(ColabelError):
    """A write to a session that the provider has closed."""


class StorageError(ColabelError):
    """The provider cannot write its folder (full disk, read-only or failing file system): nothing was saved."""


class ConflictError(ColabelError):
    """A save based on a version that is no longer the latest (another tab or client saved meanwhile)."""


class UnreadableImageError(ColabelError):
    """An image file that cannot be decoded (corrupt or unsupported)."""


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters: a refusal echoes what the caller sent
    without sending a huge argument back.

    >>> shown("a" * 200)[-8:], shown(3)
    ('aaaaa...', '3')
    """
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an integer of over 4300 digits, or nesting too deep to show
        return "a value too large to show"
    return text if len(text) <= limit else text[: limit - 3] + "..."
