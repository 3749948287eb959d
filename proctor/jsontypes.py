"""The one name for JSON whose shape this code does not pin down.

`JsonObject` is a decoded JSON object that another program defines: an answer of the API or
of the Kubernetes API server, a Kubernetes manifest, a tool call in a model provider's shape,
a sample's metadata, a spec's own dictionaries carried over the runner protocol. Its values
are `Any` on purpose: the code reads the few keys it needs and checks them where it does
(pydantic models, `isinstance`), and a precise type for every such document would be a copy
of someone else's schema. A JSON object parsed from a sandbox is never one of these: the
runner protocol's models (`proctor.protocol`) validate it first.
"""

from __future__ import annotations

from typing import Any, TypeAlias

JsonObject: TypeAlias = dict[str, Any]

__all__ = ["JsonObject"]
