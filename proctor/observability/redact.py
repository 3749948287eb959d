"""Secrets never reach a log line: every line is scrubbed before it is written.

Two nets. Shapes: Proctor's API keys (`pk_…`), JWTs, bearer and basic credentials,
provider keys (`sk-…`, AWS access keys), `key=value` pairs whose key names a secret, and
passwords in URLs. Values: every secret this process knows by value (the settings'
credentials, the provider keys the gateway read), registered with `Redactor.add`, so
that a key of any shape is caught, e.g. when a provider echoes it in an error.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable

MASK = "[REDACTED]"
MIN_SECRET = 6  # shorter values are not scrubbed by value: they would mask ordinary words

SHAPES = re.compile(
    r"\bpk_[A-Za-z0-9_\-]{8,}"
    r"|\beyJ[A-Za-z0-9_\-]{4,}\.[A-Za-z0-9_\-]{4,}\.[A-Za-z0-9_\-]*"
    r"|(?i:\b(?P<scheme>bearer|basic)\s+)[A-Za-z0-9._~+/=\-]{8,}"
    r"|\bsk-[A-Za-z0-9_\-]{16,}"
    r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"
    r"|(?i:(?P<key>[\w.\-]*(?:[_\-]key|api[_\-]?key|secret|password|passwd|token|authorization|credential)s?)"
    r"(?P<sep>[\"']?\s*[:=]\s*[\"']?))(?!\[REDACTED\])(?!(?i:bearer|basic)\s)(?!\d+(?:[\s\"',;&}]|$))[^\s\"',;&}]{4,}"
    r"|(?P<userinfo>://[^/\s:@]+:)[^/\s@]+@"
)


def _mask(match: re.Match[str]) -> str:
    if match.group("scheme"):
        return f"{match.group('scheme')} {MASK}"
    if match.group("key"):
        return f"{match.group('key')}{match.group('sep')}{MASK}"
    if match.group("userinfo"):
        return f"{match.group('userinfo')}{MASK}@"
    return MASK


class Redactor:
    """Scrubs secrets from text: by shape, and by value for the secrets added."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._values: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self._lock = threading.Lock()
        for value in secrets:
            self.add(value)

    def add(self, value: str | None) -> None:
        """Scrub `value` from now on (ignored when shorter than MIN_SECRET characters)."""
        if not value or len(value) < MIN_SECRET or value in self._values:
            return
        with self._lock:
            self._values.add(value)
            longest_first = sorted(self._values, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(v) for v in longest_first))

    def __call__(self, text: str) -> str:
        if self._pattern is not None:
            text = self._pattern.sub(MASK, text)
        return SHAPES.sub(_mask, text)


def settings_secrets(settings: object) -> list[str]:
    """The credentials among a `Settings`' values."""
    names = ("jwt_secret", "s3_secret_access_key", "s3_access_key_id", "pagerduty_routing_key")
    found = [getattr(settings, n, None) for n in names]
    found += list((getattr(settings, "otel_headers", None) or {}).values())
    state = getattr(settings, "state_url", None) or ""
    match = re.search(r"://[^/\s:@]+:([^/\s@]+)@", state)
    if match:
        found.append(match.group(1))
    return [v for v in found if v]
