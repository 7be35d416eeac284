"""Domain errors. Transport layers map these to their status codes in one place each."""

# Of any text a client sent, at most this many characters appear in an error message.
CLIENT_TEXT_CHARS = 64


def clip(text: str, limit: int = CLIENT_TEXT_CHARS) -> str:
    """Client text for an error message: quoted, cut to `limit` characters, and saying
    how long it was when it was cut (a 100 KB id echoed whole would not fit a status)."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} chars)"


class InferpoolError(Exception):
    """Base class; the message is safe to show to the caller."""


class InvalidInput(InferpoolError):
    """The request does not match the model's signature or the API's limits."""


class Undecodable(InvalidInput):
    """The request's bytes are not a message of the method's request type."""


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
