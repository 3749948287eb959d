"""The Kubernetes API as the pod runtime uses it, and the one place its errors become ours.

`KubeApi` runs the blocking `kubernetes` client on a thread pool of its own and returns
the API's JSON as plain dicts. Conversions, here and nowhere else: an `ApiException`, a
urllib3/socket error or the client's own validation error becomes a `SandboxError`
(`NotFound` for 404, `Conflict` for 409; a permission error names the RBAC to fix), and
a configuration that cannot be loaded becomes `RuntimeUnavailable`. 429, 5xx and connection errors are retried with exponential
backoff (a 429's Retry-After honoured) on the event loop's clock, `RetryPolicy.attempts`
times at most; the client's own urllib3 retries are off so that the bound is ours.

`PodInformer` watches every pod of the platform instance on one thread (list, then watch,
resumed from the last resourceVersion; polling the followed pods when watching fails),
keeps each pod's latest status, and hands every version of a followed pod to the event
loop.
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from proctor.jsontypes import JsonObject

from .base import RuntimeUnavailable, SandboxError

RETRIED = frozenset({429, 500, 502, 503, 504})
CONFIG_HINT = ("set PROCTOR_KUBECONFIG to a kubeconfig file, or run Proctor inside the cluster "
               "(deployed from kuberay/, whose service account may create pods)")


class NotFound(SandboxError):
    """The object does not exist (404). Caught by the runtime: deleting what is gone is done."""


class Conflict(SandboxError):
    """The object already exists (409). Caught by the runtime, which reads or replaces it."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    first_s: float = 0.2
    max_s: float = 5.0
    connect_s: float = 5.0
    read_s: float = 30.0


def load_configuration(kubeconfig: Path | None) -> client.Configuration:
    """The client's configuration from a kubeconfig file, else the in-cluster service
    account. Raises `RuntimeUnavailable` saying how to give one."""
    cfg = client.Configuration()
    try:
        if kubeconfig is not None:
            if not Path(kubeconfig).is_file():
                raise RuntimeUnavailable(f"kubernetes: the kubeconfig {kubeconfig} does not exist; {CONFIG_HINT}")
            config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
        else:
            config.load_incluster_config(client_configuration=cfg)
    except RuntimeUnavailable:
        raise
    except Exception as exc:  # ConfigException, YAML and file errors: all "no usable configuration"
        where = f"kubeconfig {kubeconfig}" if kubeconfig else "in-cluster configuration"
        raise RuntimeUnavailable(f"kubernetes: no usable {where} ({exc}); {CONFIG_HINT}") from exc
    cfg.retries = 0  # retried here, with a bound and backoff
    return cfg


def api_error(exc: ApiException, what: str) -> SandboxError:
    message = exc.reason or ""
    try:
        message = json.loads(exc.body or "{}").get("message") or message
    except (ValueError, AttributeError):
        pass
    denied = exc.status == 401 or (exc.status == 403 and "cannot" in message)  # RBAC: 'User "x" cannot create'
    hint = " (check the RBAC of Proctor's service account in kuberay/)" if denied else ""
    cls = {404: NotFound, 409: Conflict}.get(exc.status or 0, SandboxError)
    return cls(f"kubernetes API: {what}: {exc.status} {message}{hint}")


def _retry_after(exc: ApiException) -> float | None:
    try:
        value = (exc.headers or {}).get("Retry-After")
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _raw(answer: object) -> urllib3.BaseHTTPResponse:
    """What a client call made with `_preload_content=False` returns: the raw response, not
    the model object (`V1Pod`, ...) that the client's annotations name."""
    return cast(urllib3.BaseHTTPResponse, answer)


def _json(answer: object) -> Any:  # the API server's JSON: the callers say what they expect
    resp = _raw(answer)
    try:
        return json.loads(resp.data or b"null")
    finally:
        resp.release_conn()


class KubeApi:
    """Namespaced pods, NetworkPolicies, ConfigMaps and Services, and pod metrics, as JSON dicts."""

    def __init__(self, cfg: client.Configuration, namespace: str, retry: RetryPolicy = RetryPolicy()):
        self.cfg = cfg
        self.namespace = namespace
        self.retry = retry
        self.client = client.ApiClient(cfg)
        self.core = client.CoreV1Api(self.client)
        self.net = client.NetworkingV1Api(self.client)
        self.custom = client.CustomObjectsApi(self.client)
        self.pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="proctor-kube")
        self.calls = {"pods": ("pod", self.core), "networkpolicies": ("network_policy", self.net),
                      "configmaps": ("config_map", self.core), "services": ("service", self.core)}

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()

    def _method(self, verb: str, kind: str) -> Callable[..., Any]:
        noun, api = self.calls[kind]
        method: Callable[..., Any] = getattr(api, f"{verb}_namespaced_{noun}")
        return method

    async def call(self, what: str, fn: Callable[..., Any], *args: Any, attempts: int | None = None,
                   **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)` on the pool, retried; its JSON answer. Raises `SandboxError`.
        `fn` is a method of the Kubernetes client, whose arguments and answers are its own."""
        loop = asyncio.get_running_loop()
        tries = attempts or self.retry.attempts
        delay = self.retry.first_s
        timeout = (self.retry.connect_s, self.retry.read_s)
        job = functools.partial(fn, *args, _preload_content=False, _request_timeout=timeout, **kwargs)
        for attempt in range(1, tries + 1):
            try:
                return _json(await loop.run_in_executor(self.pool, job))
            except ApiException as exc:
                if exc.status not in RETRIED or attempt == tries:
                    error = api_error(exc, what)
                    if attempt > 1:
                        error = type(error)(f"{error} (after {attempt} attempts)")
                    raise error from exc
                wait = _retry_after(exc) or delay
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                if attempt == tries:
                    raise SandboxError(f"kubernetes API: {what}: {exc} (after {attempt} attempts)") from exc
                wait = delay
            except (ValueError, TypeError) as exc:  # the client's own validation, or an answer that is not JSON
                raise SandboxError(f"kubernetes API: {what}: {type(exc).__name__}: {exc}") from exc
            await asyncio.sleep(min(wait, self.retry.max_s) * random.uniform(0.8, 1.0))
            delay = min(delay * 2, self.retry.max_s)
        raise AssertionError("unreachable")

    async def create(self, kind: str, body: JsonObject) -> JsonObject:
        name = body["metadata"]["name"]
        made: JsonObject = await self.call(f"create {kind}/{name}", self._method("create", kind), self.namespace, body)
        return made

    async def get(self, kind: str, name: str, attempts: int | None = None) -> JsonObject:
        found: JsonObject = await self.call(f"read {kind}/{name}", self._method("read", kind), name, self.namespace,
                                            attempts=attempts)
        return found

    async def delete(self, kind: str, name: str, grace_s: int | None = None, attempts: int | None = None) -> bool:
        """Delete `name`; False if it was already gone."""
        try:
            await self.call(f"delete {kind}/{name}", self._method("delete", kind), name, self.namespace,
                            grace_period_seconds=grace_s, propagation_policy="Background", attempts=attempts)
        except NotFound:
            return False
        return True

    async def list(self, kind: str, label_selector: str) -> builtins.list[JsonObject]:
        found: JsonObject = await self.call(f"list {kind}", self._method("list", kind), self.namespace,
                                            label_selector=label_selector)
        items: builtins.list[JsonObject] = found.get("items") or []
        return items

    async def events_of(self, pod: str) -> builtins.list[JsonObject]:
        """The events about pod `pod` (core/v1), oldest first as the API lists them."""
        found: JsonObject = await self.call(f"list events of pod/{pod}", self.core.list_namespaced_event,
                                            self.namespace,
                                            field_selector=f"involvedObject.kind=Pod,involvedObject.name={pod}")
        items: builtins.list[JsonObject] = found.get("items") or []
        return items

    async def pod_metrics(self, name: str) -> JsonObject:
        """The metrics API's view of a pod (metrics-server); one attempt."""
        metrics: JsonObject = await self.call(f"read metrics of pod/{name}", self.custom.get_namespaced_custom_object,
                                              "metrics.k8s.io", "v1beta1", self.namespace, "pods", name, attempts=1)
        return metrics

    def get_pod_now(self, name: str) -> JsonObject | None:
        """The pod, read once from this thread; None if it does not exist."""
        try:
            pod: JsonObject = _json(self.core.read_namespaced_pod(
                name, self.namespace, _preload_content=False, _request_timeout=(self.retry.connect_s, self.retry.read_s)))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return pod


GONE = None  # what a follower is handed once its pod no longer exists
# what a follower is handed: the pod's latest version, GONE, or why it could not be read
PodVersion = JsonObject | None | SandboxError


class Follower:
    """One pod's versions, as `PodInformer.follow` hands them: the pod's JSON, `GONE`, or a
    `SandboxError`, on `queue` (in the event loop that asked)."""

    def __init__(self, informer: "PodInformer", name: str):
        self.informer = informer
        self.name = name
        self.queue: asyncio.Queue[PodVersion] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()

    def hand(self, item: PodVersion) -> None:
        try:
            self._loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            self.informer.unfollow(self)

    def stop(self) -> None:
        self.informer.unfollow(self)


class PodInformer:
    """One watch of every pod of this platform instance (`selector`), for the whole runtime,
    instead of one per starting pod: a list, then a watch from its resourceVersion, resumed
    every `watch_s` (relisted after a 410), on one thread. It keeps the latest status of
    each pod, so that whoever follows a pod gets its current version at once and every
    later one in order. When the API refuses to list or watch, it reads the followed pods
    every `poll_s` instead, and tries watching again every `rewatch_s` (a refusal may pass:
    RBAC still spreading at deploy time); a refusal that reading meets too is handed to
    their followers."""

    watch_s = 30
    poll_s = 1.0
    rewatch_s = 60.0

    def __init__(self, api: "KubeApi", selector: str):
        self.api = api
        self.selector = selector
        self._lock = threading.Lock()
        self._pods: dict[str, JsonObject] = {}  # name -> its latest version (status, no spec)
        self._synced = False  # listed since the (re)start: `_pods` is the whole truth
        self._followers: dict[str, list[Follower]] = {}
        self._stop = threading.Event()
        self._resp: urllib3.BaseHTTPResponse | None = None
        self._thread: threading.Thread | None = None

    def follow(self, name: str) -> Follower:
        """Follow pod `name` (call it from the event loop, after creating the pod)."""
        f = Follower(self, name)
        with self._lock:
            self._followers.setdefault(name, []).append(f)
            if self._synced and name in self._pods:
                f.hand(self._pods[name])
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="proctor-pod-informer", daemon=True)
                self._thread.start()
        return f

    def unfollow(self, f: Follower) -> None:
        with self._lock:
            found = self._followers.get(f.name, [])
            if f in found:
                found.remove(f)
            if not found:
                self._followers.pop(f.name, None)

    def close(self) -> None:
        """Stop after the current watch request (at most `watch_s`; the thread is a daemon)."""
        self._stop.set()

    # ------------------------------------------------------------ the thread

    def _update(self, name: str, pod: JsonObject | None) -> None:
        with self._lock:
            if pod is None:
                self._pods.pop(name, None)
            else:
                self._pods[name] = pod
            followers = list(self._followers.get(name, []))
        for f in followers:
            f.hand(pod)

    def _run(self) -> None:
        pause = self.api.retry.first_s
        while not self._stop.is_set():
            try:
                self._watch()
                return
            except ApiException as exc:
                if exc.status not in RETRIED:  # not allowed to list or watch: read the followed pods meanwhile
                    with self._lock:
                        self._synced = False
                    self._poll(self.rewatch_s)
                    pause = self.api.retry.first_s
                    continue
            except Exception:  # noqa: BLE001 - the API server is away, or the stream broke: list and watch again
                pass
            if self._stop.wait(pause):
                return
            pause = min(pause * 2, self.api.retry.max_s)

    def _relist(self) -> str:
        found = _json(self.api.core.list_namespaced_pod(
            self.api.namespace, label_selector=self.selector, _preload_content=False,
            _request_timeout=(self.api.retry.connect_s, self.api.retry.read_s)))
        pods = {p["metadata"]["name"]: _brief(p) for p in found.get("items") or []}
        with self._lock:
            gone = [n for n in self._pods if n not in pods]
            changed = [n for n, p in pods.items() if self._pods.get(n) != p]
            was_synced, self._synced = self._synced, True
            self._pods.update(pods)
            for n in gone:
                del self._pods[n]
            waiting = {n: list(fs) for n, fs in self._followers.items()}
        for name, followers in waiting.items():
            if name in changed or (not was_synced and name in pods) or name in gone:
                for f in followers:
                    f.hand(pods.get(name, GONE))
        return str((found.get("metadata") or {}).get("resourceVersion") or "")

    def _watch(self) -> None:
        version = None
        while not self._stop.is_set():
            if version is None:
                version = self._relist()
            self._resp = stream = _raw(self.api.core.list_namespaced_pod(
                self.api.namespace, label_selector=self.selector, watch=True, resource_version=version,
                timeout_seconds=self.watch_s, allow_watch_bookmarks=True, _preload_content=False,
                _request_timeout=(self.api.retry.connect_s, self.watch_s + 10)))
            try:
                for line in _lines(stream):
                    event = json.loads(line)
                    obj = event.get("object") or {}
                    if event.get("type") == "ERROR":
                        if obj.get("code") == 410:  # too old: list again and watch from there
                            version = None
                            break
                        raise SandboxError(f"kubernetes API: watch pods: {obj.get('message')}")
                    meta = obj.get("metadata") or {}
                    version = meta.get("resourceVersion") or version
                    if event.get("type") in ("ADDED", "MODIFIED"):
                        self._update(meta["name"], _brief(obj))
                    elif event.get("type") == "DELETED":
                        self._update(meta["name"], GONE)
                    if self._stop.is_set():
                        return
            finally:
                self._resp = None
                stream.close()  # left early (a 410, a stop) it holds unread data: never back to the pool
                stream.release_conn()

    def _poll(self, for_s: float) -> None:
        failures: dict[str, int] = {}
        until = time.monotonic() + for_s
        while time.monotonic() < until and not self._stop.wait(self.poll_s):
            with self._lock:
                names = list(self._followers)
            for name in names:
                try:
                    pod = self.api.get_pod_now(name)
                except ApiException as exc:
                    if exc.status not in RETRIED:
                        self._fail(name, api_error(exc, f"read pod/{name}"))
                        continue
                    failures[name] = failures.get(name, 0) + 1
                except (urllib3.exceptions.HTTPError, OSError):
                    failures[name] = failures.get(name, 0) + 1
                else:
                    failures.pop(name, None)
                    self._update(name, _brief(pod) if pod is not None else GONE)
                if failures.get(name, 0) >= self.api.retry.attempts:
                    failures.pop(name, None)
                    self._fail(name, SandboxError(f"kubernetes API: read pod/{name}: unreachable"))

    def _fail(self, name: str, error: SandboxError) -> None:
        with self._lock:
            followers = self._followers.pop(name, [])
        for f in followers:
            f.hand(error)


def _brief(pod: JsonObject) -> JsonObject:
    """What is kept of a pod: its metadata (without managedFields) and status."""
    meta = {k: v for k, v in (pod.get("metadata") or {}).items() if k != "managedFields"}
    return {"metadata": meta, "status": pod.get("status") or {}}


def _lines(resp: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
    """The lines of a streamed response (a watch sends one JSON event per line)."""
    pending = b""
    for chunk in resp.stream(16 * 1024, decode_content=False):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.strip():
                yield line
    if pending.strip():
        yield pending
