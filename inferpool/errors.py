"""Domain errors. Transport layers map these to their status codes in one place each."""


class InferpoolError(Exception):
    """Base class; the message is safe to show to the caller."""


class InvalidInput(InferpoolError):
    """The request does not match the model's signature or the API's limits."""


class ModelNotFound(InferpoolError):
    """No such model, or no such version of it."""


class JobNotFound(InferpoolError):
    """No such job: never created, expired, or not visible to this caller."""


class Overloaded(InferpoolError):
    """The server refuses work it cannot finish in time."""


class BackendUnavailable(InferpoolError):
    """A dependency the request needs (the broker) cannot be reached."""


class DeadlineExceeded(InferpoolError):
    """No answer arrived before the caller's deadline."""


class ModelFailed(InferpoolError):
    """The worker could not compute this input."""
