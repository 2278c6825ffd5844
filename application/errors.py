"""The few exceptions through which handlers steer a message's outcome.

Handlers never ack or nack. They return normally (ACK) or raise:

* :class:`TransientError` - "try again later": the dispatcher retries in-process with backoff, then asks
  the broker to redeliver after a delay; once the delivery attempt reaches ``max_attempts`` the message
  is dead-lettered with the last error as its reason.
* :class:`PermanentError` - "this message can never succeed": dead-lettered at once.

Any other exception is treated as transient (a bug or an unclassified client error must not lose the
message), and logged with its traceback. :class:`DecodeError` is raised by the factory, not handlers.
"""

from __future__ import annotations


class IncidentdError(Exception):
    """Base of incidentd's own errors."""


class DecodeError(IncidentdError):
    """The message cannot become a command: not JSON, not an object, unknown type, or schema violation.

    The message names the problem (for a schema violation: each failing field path).
    """


class PermanentError(IncidentdError):
    """Retrying cannot help (e.g. the incident named does not exist, a 4xx from an API)."""


class TransientError(IncidentdError):
    """Retrying later may help (timeouts, connection errors, 5xx, throttling).

    ``retry_after`` (seconds), when set, is the least delay before the next redelivery.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BrokerOperationError(IncidentdError):
    """An operator's request (setup, publish, dead-letter replay or purge) that the broker refused or
    cannot do; the CLI prints the message and exits non-zero."""
