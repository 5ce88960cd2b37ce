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
