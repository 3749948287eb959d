"""The double's object store: namespaced objects with resourceVersions, selectors, an
event log that watches read from, and ownerReference garbage collection.

Deleting a pod that runs on a node is graceful, as on the real API server: with a grace
period (the request's `gracePeriodSeconds`, else the pod's
`terminationGracePeriodSeconds`) the pod stays, marked with `deletionTimestamp`, until
the kubelet has stopped its container and removes it; with 0 (a forced delete), or for a
pod that was never placed or has ended, it goes at once."""

from __future__ import annotations

import copy
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

KINDS = {"pods": "Pod", "configmaps": "ConfigMap", "networkpolicies": "NetworkPolicy", "events": "Event",
         "services": "Service"}
EVENTS_KEPT = 10_000


class ApiError(Exception):
    """Answered as a Kubernetes `Status` with this code and reason."""

    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def status(self) -> dict[str, Any]:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": self.message,
                "reason": self.reason, "details": self.details, "code": self.code}


def not_found(kind: str, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{kind} "{name}" not found', {"name": name, "kind": kind})


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def label_match(labels: dict[str, str], selector: str | None) -> bool:
    """`k=v`, `k==v`, `k!=v`, `k` and `!k` terms, comma-separated, all of which must hold."""
    for term in filter(None, (t.strip() for t in (selector or "").split(","))):
        if "!=" in term:
            k, v = term.split("!=", 1)
            ok = labels.get(k.strip()) != v.strip()
        elif "=" in term:
            k, v = term.replace("==", "=").split("=", 1)
            ok = labels.get(k.strip()) == v.strip()
        elif term.startswith("!"):
            ok = term[1:].strip() not in labels
        else:
            ok = term in labels
        if not ok:
            return False
    return True


def field_match(obj: dict[str, Any], selector: str | None) -> bool:
    for term in filter(None, (t.strip() for t in (selector or "").split(","))):
        negate = "!=" in term
        path, value = term.replace("!=", "=").replace("==", "=").split("=", 1)
        current: Any = obj
        for part in path.strip().split("."):
            current = current.get(part) if isinstance(current, dict) else None
        if (str(current or "") == value.strip()) == negate:
            return False
    return True


class Store:
    def __init__(self) -> None:
        self.cond = threading.Condition(threading.RLock())
        self.rv = 0
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        # (resourceVersion, kind, namespace, event type, object)
        self.log: deque[tuple[int, str, str, str, dict[str, Any]]] = deque(maxlen=EVENTS_KEPT)
        self.on_delete: list[Callable[[str, dict[str, Any]], None]] = []
        self.on_terminating: list[Callable[[str, str, int], None]] = []  # (namespace, pod, grace s)
        self.closed = False

    def _emit(self, kind: str, ns: str, type_: str, obj: dict[str, Any]) -> None:
        self.log.append((self.rv, kind, ns, type_, copy.deepcopy(obj)))
        self.cond.notify_all()

    def _bump(self, obj: dict[str, Any]) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)

    def create(self, kind: str, ns: str, obj: dict[str, Any]) -> dict[str, Any]:
        with self.cond:
            meta = obj.setdefault("metadata", {})
            name = meta.get("name")
            if (kind, ns, name) in self.objects:
                raise ApiError(409, "AlreadyExists", f'{kind} "{name}" already exists', {"name": name, "kind": kind})
            meta.update(namespace=ns, uid=str(uuid.uuid4()), creationTimestamp=now_iso(), generation=1)
            obj.setdefault("apiVersion", "v1")
            obj.setdefault("kind", KINDS[kind])
            self._bump(obj)
            self.objects[(kind, ns, name)] = obj
            self._emit(kind, ns, "ADDED", obj)
            owners = {o.get("uid") for o in meta.get("ownerReferences") or []}
            if owners and not owners & self._uids():  # the garbage collector takes orphans at once
                self.delete(kind, ns, name)
            return copy.deepcopy(obj)

    def _uids(self) -> set[str]:
        return {o["metadata"]["uid"] for o in self.objects.values()}

    def get(self, kind: str, ns: str, name: str) -> dict[str, Any]:
        with self.cond:
            obj = self.objects.get((kind, ns, name))
            if obj is None:
                raise not_found(kind, name)
            return copy.deepcopy(obj)

    def find(self, kind: str, ns: str, name: str) -> dict[str, Any] | None:
        with self.cond:
            obj = self.objects.get((kind, ns, name))
            return copy.deepcopy(obj) if obj is not None else None

    def update(self, kind: str, ns: str, name: str, change: Callable[[dict[str, Any]], None]) -> dict[str, Any] | None:
        """Apply `change` to the stored object (None if it is gone), as one new version."""
        with self.cond:
            obj = self.objects.get((kind, ns, name))
            if obj is None:
                return None
            change(obj)
            self._bump(obj)
            self._emit(kind, ns, "MODIFIED", obj)
            return copy.deepcopy(obj)

    def delete(self, kind: str, ns: str, name: str, grace_s: int | None = None) -> dict[str, Any]:
        with self.cond:
            obj = self.objects.get((kind, ns, name))
            if obj is None:
                raise not_found(kind, name)
            grace = self._grace(kind, obj, grace_s)
            if grace > 0:  # marked; the kubelet stops the container, then removes the pod
                meta = obj["metadata"]
                shortened = grace < meta.get("deletionGracePeriodSeconds", grace + 1)
                if shortened:  # a later delete may only shorten the grace period
                    meta.setdefault("deletionTimestamp", now_iso())
                    meta["deletionGracePeriodSeconds"] = grace
                    self._bump(obj)
                    self._emit(kind, ns, "MODIFIED", obj)
                marked = copy.deepcopy(obj)
            else:
                del self.objects[(kind, ns, name)]
                obj["metadata"].setdefault("deletionTimestamp", now_iso())
                obj["metadata"]["deletionGracePeriodSeconds"] = 0
                self._bump(obj)
                self._emit(kind, ns, "DELETED", obj)
                uid = obj["metadata"]["uid"]
                dependents = [k for k, o in self.objects.items()
                              if uid in {r.get("uid") for r in o["metadata"].get("ownerReferences") or []}]
        if grace > 0:
            if shortened:
                for terminating in self.on_terminating:
                    terminating(ns, name, grace)
            return marked
        for hook in self.on_delete:
            hook(kind, obj)
        for dep_kind, dep_ns, dep_name in dependents:
            with self.cond:
                dep = self.objects.get((dep_kind, dep_ns, dep_name))
                alive = dep is not None and {r.get("uid") for r in dep["metadata"]["ownerReferences"]} & self._uids()
            if dep is not None and not alive:
                try:
                    self.delete(dep_kind, dep_ns, dep_name)
                except ApiError:
                    pass
        return copy.deepcopy(obj)

    @staticmethod
    def _grace(kind: str, obj: dict[str, Any], grace_s: int | None) -> int:
        """The grace period a delete gets: 0 (at once) but for a pod placed on a node and not
        ended, which gets the request's period, else its own (30 s by default)."""
        if kind != "pods" or not (obj.get("spec") or {}).get("nodeName"):
            return 0
        if (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            return 0
        own = (obj.get("spec") or {}).get("terminationGracePeriodSeconds", 30)
        return max(0, int(grace_s if grace_s is not None else own))

    def list(self, kind: str, ns: str, labels: str | None, fields: str | None) -> tuple[list[dict[str, Any]], str]:
        with self.cond:
            items = [copy.deepcopy(o) for (k, n, _), o in sorted(self.objects.items())
                     if k == kind and n == ns and label_match(o["metadata"].get("labels") or {}, labels)
                     and field_match(o, fields)]
            return items, str(self.rv)

    def watch(self, kind: str, ns: str, since: str | None, labels: str | None, fields: str | None,
              timeout_s: float) -> Iterator[tuple[str, dict[str, Any]]]:
        """(type, object) events after resourceVersion `since` (all current objects as ADDED
        without one); ("ERROR", Status) with 410 if `since` is older than the log."""
        deadline = time.monotonic() + timeout_s
        with self.cond:
            if not since or since == "0":
                items, current = self.list(kind, ns, labels, fields)
                after = int(current)
                ready = [("ADDED", o) for o in items]
            else:
                after = int(since)
                oldest = self.log[0][0] if self.log else self.rv + 1
                if after < oldest - 1 and len(self.log) == self.log.maxlen:
                    gone = ApiError(410, "Expired", f"too old resource version: {after} ({oldest})")
                    yield "ERROR", gone.status()
                    return
                ready = []
        for event in ready:
            yield event
        while True:
            with self.cond:
                fresh = [(t, o) for rv, k, n, t, o in self.log
                         if rv > after and k == kind and n == ns and field_match(o, fields)
                         and label_match(o["metadata"].get("labels") or {}, labels)]
                after = self.rv
                left = deadline - time.monotonic()
                if not fresh:
                    if left <= 0 or self.closed:
                        return
                    self.cond.wait(min(left, 0.5))
                    continue
            for event in fresh:
                yield event
