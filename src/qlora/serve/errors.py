"""The server's errors: each knows its HTTP status and OpenAI's error ``type`` / ``code``.

The HTTP layer turns any `ServeError` into ``{"error": {"message", "type", "code"}}`` with its
status, so the engine raises them without knowing about HTTP responses.
"""

from __future__ import annotations

__all__ = [
    "AdapterLoadError",
    "AuthenticationError",
    "BadRequestError",
    "ContextLengthError",
    "ServeError",
    "UnknownModelError",
]


class ServeError(ValueError):
    """A request the server refuses; ``status`` / ``type`` / ``code`` go into the response."""

    status: int = 400
    type: str = "invalid_request_error"
    code: str = "invalid_value"


class BadRequestError(ServeError):
    """A malformed body or a field out of range (400)."""


class ContextLengthError(ServeError):
    """The prompt plus ``max_tokens`` does not fit the model's context (400)."""

    code = "context_length_exceeded"


class AdapterLoadError(ServeError):
    """An adapter that cannot be loaded or unloaded as asked (400); the server keeps serving."""

    code = "adapter_load_failed"


class UnknownModelError(ServeError):
    """A ``model`` (or ``lora_name`` to unload) that is neither the base nor a loaded adapter."""

    status = 404
    code = "model_not_found"


class AuthenticationError(ServeError):
    """A missing or wrong ``Authorization: Bearer`` key (401)."""

    status = 401
    code = "invalid_api_key"
