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


class UnreadableImageError(ColabelError):
    """An image file that cannot be decoded (corrupt or unsupported)."""
