"""Domain errors: raised anywhere below the API, mapped to HTTP statuses once, in api/errors.py.

Each message tells the user what to do. `param` names the offending request field when known.
"""

from __future__ import annotations


class CsmError(Exception):
    """Base of every error a request can cause. Not for bugs: those stay plain exceptions."""

    code = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidInput(CsmError):
    """The request is well-formed but a value is not acceptable (-> 400/422)."""

    code = "invalid_value"


class InputTooLong(CsmError):
    """Text, upload or output over a configured limit (-> 413)."""

    code = "too_long"


class UnsupportedMedia(CsmError):
    """An upload that is not audio we accept, or that does not decode (-> 415)."""

    code = "unsupported_media"


class ContextOverflow(CsmError):
    """Prompt plus requested audio do not fit the model's 2048-position window (-> 422)."""

    code = "context_length_exceeded"


class NotFound(CsmError):
    code = "not_found"


class VoiceNotFound(NotFound):
    code = "voice_not_found"


class SessionNotFound(NotFound):
    code = "session_not_found"


class Overloaded(CsmError):
    """No capacity now; retry later (-> 429/503 with Retry-After)."""

    code = "overloaded"

    def __init__(self, message: str, *, retry_after: float = 1.0, param: str | None = None):
        super().__init__(message, param=param)
        self.retry_after = retry_after


class EngineDead(Exception):
    """The engine loop failed: fatal for the process (/health goes red, sockets close with 1011)."""
