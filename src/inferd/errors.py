"""inferd's error hierarchy: every failure a user can see is one of these.

Code anywhere in inferd raises these typed errors; exactly two places turn them into what a user
sees: `inferd.server.errors` maps them to the OpenAI error envelope with their HTTP status, and
`inferd.cli.main` prints one line and exits with code 2 (user errors) or 1 (runtime failures).
Lower-level exceptions (OSError, aiohttp, subprocess) are caught at each boundary and re-raised as
one of these, so nothing else leaks out.

    InferdError                       500 server_error
    ├── UsageError                    exit 2: the user asked for something that cannot be done
    │   ├── ConfigError               a setting, flag or config file is invalid
    │   ├── UnknownModelError         no catalog entry with that id
    │   ├── NoProfileError            no profile of the model fits this hardware
    │   ├── CacheNotWritableError     the cache folder cannot be written
    │   └── PortInUseError            the listen address is taken
    ├── CacheError                    fetching, verifying or converting a model failed
    │   ├── IntegrityError            a file's sha256 differs from the recorded one
    │   └── AdapterError              a LoRA adapter cannot be served on its base model
    ├── EngineError                   the engine failed
    │   ├── EngineStartError          it exited or timed out before it was ready
    │   ├── EngineNotReadyError       503 + Retry-After: not (yet) ready for requests
    │   ├── EngineUnavailableError    502: it could not be reached mid-request
    │   └── GuardModelError           502: a guardrail's guard model (at a URL) failed
    ├── RequestError                  400 invalid_request_error
    │   ├── InvalidRequestError       400: malformed JSON or an invalid field (names the field)
    │   │   └── PreviousResponseNotFoundError  400: `previous_response_id` names no stored one
    │   ├── ModelNotFoundError        404 model_not_found
    │   ├── RouteNotFoundError        404: no such route
    │   ├── NotFoundError             404 not_found: no such stored object (a response id)
    │   ├── PayloadTooLargeError      413: the body exceeds the limit
    │   └── ContentFilterError        400 content_filter: a guardrail blocked it
    ├── AuthenticationError           401: no key, or a key that is not valid
    ├── RateLimitError                429 + Retry-After: a key's requests or tokens per minute
    └── UnavailableError              503 + Retry-After: try again later
        ├── OverloadedError           every slot taken and the queue full, or queued too long
        └── DrainingError             the service is shutting down
"""

from __future__ import annotations


class InferdError(Exception):
    """Base of every error inferd raises on purpose."""

    status: int = 500
    type: str = "server_error"
    code: str | None = "internal_error"
    exit_code: int = 1

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def headers(self) -> dict[str, str]:
        """Extra HTTP headers this error carries (Retry-After and the like)."""
        return {}


class UsageError(InferdError):
    """The user asked for something that cannot be done; the CLI exits with code 2."""

    exit_code = 2
    code = "usage_error"


class ConfigError(UsageError):
    code = "invalid_config"


class UnknownModelError(UsageError):
    code = "model_not_found"


class NoProfileError(UsageError):
    code = "no_profile"


class CacheNotWritableError(UsageError):
    code = "cache_not_writable"


class PortInUseError(UsageError):
    code = "port_in_use"


class CacheError(InferdError):
    code = "cache_error"


class IntegrityError(CacheError):
    code = "integrity_error"


class AdapterError(CacheError):
    """An adapter that cannot be served (another base model, rank over the limit, a broken
    file): refused with this reason while the service goes on serving the rest."""

    code = "adapter_refused"


class _RetryLater(InferdError):
    """An error that tells the client when to try again (`Retry-After`)."""

    def __init__(self, message: str, *, retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class EngineError(InferdError):
    code = "engine_error"


class EngineStartError(EngineError):
    code = "engine_start_failed"


class EngineNotReadyError(EngineError, _RetryLater):
    status = 503
    code = "engine_not_ready"


class EngineUnavailableError(EngineError):
    status = 502
    code = "engine_unavailable"


class GuardModelError(EngineError):
    """A guard model's server (a guardrail's, at a URL) answered with an error or not at all."""

    status = 502
    code = "guard_model_error"


class RequestError(InferdError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class InvalidRequestError(RequestError):
    pass


class PreviousResponseNotFoundError(InvalidRequestError):
    """`previous_response_id` names no stored response (never stored, deleted, evicted, or lost
    with a restart): OpenAI answers 400 with this code and the field."""

    code = "previous_response_not_found"


class ModelNotFoundError(RequestError):
    status = 404
    code = "model_not_found"


class RouteNotFoundError(RequestError):
    status = 404
    code = "not_found"


class NotFoundError(RequestError):
    status = 404
    code = "not_found"


class PayloadTooLargeError(RequestError):
    status = 413
    code = "request_too_large"


class ContentFilterError(RequestError):
    """A guardrail blocked the request (or, without a configured refusal, its answer)."""

    code = "content_filter"


class AuthenticationError(InferdError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class RateLimitError(_RetryLater):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class UnavailableError(_RetryLater):
    status = 503
    code = "unavailable"


class OverloadedError(UnavailableError):
    code = "overloaded"


class DrainingError(UnavailableError):
    code = "shutting_down"
