"""Typed engine errors. Each maps once, at the service edge, to a gRPC status and an HTTP code."""


class PdserveError(Exception):
    """Base class of every error pdserve raises on purpose."""

    grpc_status = "INTERNAL"
    http_status = 500


class InvalidRequestError(PdserveError, ValueError):
    """The request itself is wrong (bad sampling params, empty or over-long prompt, bad token ids).

    Raised before any KV block is allocated, so a bad request never touches engine state.
    """

    grpc_status = "INVALID_ARGUMENT"
    http_status = 400


class ConfigError(PdserveError, ValueError):
    """The engine configuration is inconsistent (e.g. the KV pool cannot hold one max-length request)."""

    grpc_status = "FAILED_PRECONDITION"
    http_status = 500


class ModelLoadError(PdserveError):
    """The model could not be found or read (unknown path, corrupt weights, unsupported architecture)."""

    grpc_status = "FAILED_PRECONDITION"
    http_status = 500


class EngineDeadError(PdserveError):
    """The engine loop has stopped after an unexpected error; no further requests can be served."""

    grpc_status = "UNAVAILABLE"
    http_status = 503


class EngineFailedError(PdserveError):
    """The engine failed while it was running this request (a step raised). The worker is going
    down; a router moves the request to another instance when one is up."""

    grpc_status = "INTERNAL"
    http_status = 500


class NotFoundError(PdserveError, LookupError):
    """The request names something this deployment does not serve (e.g. an unknown model)."""

    grpc_status = "NOT_FOUND"
    http_status = 404


class UnavailableError(PdserveError):
    """No instance can take the request right now (none registered, all unreachable)."""

    grpc_status = "UNAVAILABLE"
    http_status = 503


class OverloadedError(PdserveError):
    """Admission control refused the request: the waiting queue is full. Try again later
    (HTTP 429 with Retry-After), unlike UnavailableError, where nothing can serve at all."""

    grpc_status = "RESOURCE_EXHAUSTED"
    http_status = 429


class UpstreamError(PdserveError):
    """A worker behind the router ended the request with a gRPC status; it passes through."""

    # gRPC status name -> HTTP code, for the statuses a worker can end a request with.
    _HTTP = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "FAILED_PRECONDITION": 400, "RESOURCE_EXHAUSTED": 429,
             "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504, "CANCELLED": 499, "ABORTED": 409}

    def __init__(self, grpc_status: str, message: str) -> None:
        super().__init__(message)
        self.grpc_status = grpc_status
        self.http_status = self._HTTP.get(grpc_status, 500)
