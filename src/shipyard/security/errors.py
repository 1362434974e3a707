"""The errors of the security layer, each with the HTTP status it is answered with.

They are `ShipyardError`s, so the API renders them like every other error (one JSON body,
never a traceback) and the client rebuilds them by their `kind`."""

from __future__ import annotations

from shipyard.errors import ShipyardError


class SecurityError(ShipyardError):
    """Base of the security errors; `http_status` is the status the API answers with."""

    http_status = 400
    exit_code = 2


class AuthenticationError(SecurityError):
    """Nobody we know: no credentials, or credentials that do not check out (401)."""

    http_status = 401


class PermissionDenied(SecurityError):
    """Someone we know, who may not do this (403)."""

    http_status = 403


class RateLimited(SecurityError):
    """Too many authentication failures from this source (429): retry later."""

    http_status = 429
    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None,
                 retry_after: int = 60) -> None:
        super().__init__(message, hint=hint)
        self.retry_after = retry_after


class PayloadTooLarge(SecurityError):
    """The request body is over the server's limit (413)."""

    http_status = 413


class SecurityConfigError(SecurityError):
    """security.yaml, a token request or a certificate is not usable (exit code 2)."""
