"""Transient store errors, told apart from the others, and retried with bounded backoff.

An object store refuses or resets connections while it restarts, times out while it is
overloaded, and answers 5xx or `SlowDown` when it throttles; all of these pass. A missing
bucket, a denied key or a file that is not there do not: retrying them only delays the
error. `is_transient` decides from the exception (its type, an HTTP status, an AWS error
code, or pyarrow's and botocore's messages, which are all the AWS C++ SDK leaves us), and
`retrying` runs a call again after each transient failure, with exponential backoff and
full jitter, until a deadline; then it raises `StoreUnavailable`.

Time and randomness are parameters, so backoff is tested without sleeping.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# the AWS C++ SDK (pyarrow), botocore and the OS say "the store is away or busy" in these words
TRANSIENT_WORDS = (
    "network_connection", "curlcode", "couldn't connect", "could not connect", "connection refused",
    "connection reset", "reset by peer", "connection aborted", "connection was closed", "broken pipe",
    "timed out", "timeout", "slow_down", "slowdown", "service_unavailable", "serviceunavailable",
    "internal_failure", "internalerror", "throttl", "requesttimeout", "request_timeout",
    "empty reply from server", "failure when receiving data", "http response code 5", "http status code 5",
    "(503)", "(500)", "(502)", "(504)", "503 service", "502 bad gateway", "504 gateway",
)
# not transient, whatever else the message says
PERMANENT_WORDS = ("nosuchbucket", "no_such_bucket", "accessdenied", "access_denied", "invalidaccesskeyid",
                   "signaturedoesnotmatch", "not found", "does not exist")
TRANSIENT_TYPES = ("EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
                   "ProxyConnectionError")


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) says the store is briefly away or
    busy, so that the same call may succeed later."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if _transient_one(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def _transient_one(exc: BaseException) -> bool:
    if getattr(exc, "transient", None) is True:
        return True
    if isinstance(exc, FileNotFoundError | PermissionError):
        return False
    if isinstance(exc, ConnectionError | TimeoutError) or type(exc).__name__ in TRANSIENT_TYPES:
        return True
    response = getattr(exc, "response", None)  # botocore's ClientError
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        code = str(response.get("Error", {}).get("Code", ""))
        return status >= 500 or status == 429 or code in ("SlowDown", "Throttling", "RequestTimeout",
                                                          "ServiceUnavailable", "InternalError")
    text = str(exc).lower()
    if any(word in text for word in PERMANENT_WORDS):
        return False
    return any(word in text for word in TRANSIENT_WORDS)


class StoreUnavailable(OSError):
    """Mixed into the `StorageError` raised when a store stayed away for a whole retry
    window (`cluster.storage`). The aggregator catches it and spills to its outbox."""


def backoff_s(attempt: int, base_s: float = 0.2, cap_s: float = 5.0,
              rand: Callable[[], float] = random.random) -> float:
    """The pause before retry `attempt` (1-based): full jitter over an exponential that
    stops growing at `cap_s`."""
    return rand() * min(cap_s, base_s * 2 ** attempt)


def retrying(call: Callable[[], T], window_s: float, *, unavailable: Callable[[BaseException, float], BaseException],
             sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
             rand: Callable[[], float] = random.random) -> T:
    """`call()`, again after each transient failure until `window_s` has passed since the
    first; then raises `unavailable(last error, seconds waited)`. Other errors propagate at once."""
    started = clock()
    attempt = 0
    while True:
        try:
            return call()
        except Exception as exc:
            if not is_transient(exc):
                raise
            attempt += 1
            waited = clock() - started
            pause = backoff_s(attempt, rand=rand)
            if waited + pause > window_s:
                raise unavailable(exc, waited) from exc
            sleep(pause)
