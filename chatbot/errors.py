"""The few exceptions Duet raises on purpose.

Each carries a message written for the person who caused it. The UI and the API turn them
into `gr.Error` at the edge; the CLI prints them as one line. Anything else is a bug.
"""


class DuetError(Exception):
    """Base class: a problem the user can understand and act on."""


class ModelLoadError(DuetError):
    """The model could not be found, loaded or used for chat."""


class InvalidInput(DuetError):
    """A request was malformed: empty or over-long message, unknown choice, ..."""


class NotFound(DuetError):
    """No such conversation or pair for this user (other users' data is reported the same way)."""


class Conflict(DuetError):
    """The request is valid but the state forbids it: a second vote, a reply still pending, ..."""


class TooBusy(Conflict):
    """Too many requests: a user's vote rate limit, or a full generation queue. Try later."""


class AdapterError(DuetError):
    """An adapter folder is missing, incomplete or does not match its manifest."""


class EngineError(DuetError):
    """The generation engine (a vLLM server) cannot be reached or failed a request."""
