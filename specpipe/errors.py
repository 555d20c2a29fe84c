"""Domain errors, free of grpc: the RPC layer maps each class to one status code.

Raise these from domain code; `specpipe.rpc.interceptor` turns them into gRPC statuses, so a servicer never
has to choose a status code itself.
"""

from __future__ import annotations


class SpecpipeError(Exception):
    """Base class; the message is sent to the client verbatim, so it must name the offending field."""


class InvalidArgumentError(SpecpipeError):
    """A request field is malformed or out of range (INVALID_ARGUMENT)."""


class NotFoundError(SpecpipeError):
    """A named entity (a session id) does not exist (NOT_FOUND)."""


class FailedPreconditionError(SpecpipeError):
    """The system is not in the state the request needs, e.g. a stale session version.

    Maps to FAILED_PRECONDITION.
    """


class ResourceExhaustedError(SpecpipeError):
    """A configured limit was reached (RESOURCE_EXHAUSTED)."""


class UnavailableError(SpecpipeError):
    """A dependency (worker, session store) cannot be reached; the request may be retried (UNAVAILABLE)."""


class DeadlineExceededError(SpecpipeError):
    """The request's deadline passed before it finished (DEADLINE_EXCEEDED)."""
