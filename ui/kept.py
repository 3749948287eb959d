"""What the dashboard keeps between refreshes: each token's client, finished evaluations'
rows and graphs, what each browser tab was last sent. Gradio runs handlers on a thread
pool (a tick's three parts side by side, several tabs at once), so all of it is kept in
`Recent` maps: bounded, oldest out first, safe from several threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import gradio as gr
import pandas as pd

from proctor.client import Client, NotFoundError, ProctorError
from proctor.statuses import TERMINAL

K = TypeVar("K")
V = TypeVar("V")

MAX_TABS = 256  # browser tabs (and tokens) remembered
FINISHED_KEPT = 32  # finished evaluations whose rows and resource graphs the dashboard keeps
SAMPLE_COLUMNS = ("sample_id", "epoch", "input", "target", "output", "score", "error")
SAMPLE_ROWS = 200  # the sample browser shows the first rows


class Recent(Generic[K, V]):
    """At most `most` entries; putting or taking one makes it the newest, and the oldest
    goes first (handed to `dropped`, e.g. to close it)."""

    def __init__(self, most: int, dropped: Callable[[V], Any] | None = None):
        self.most = most
        self.dropped = dropped
        self._items: dict[K, V] = {}
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            return self._items.get(key)

    def put(self, key: K, value: V) -> V | None:
        """Keep `value` as the newest; returns what `key` held before."""
        return self.take(key, lambda before: value)[0]

    def take(self, key: K, make: Callable[[V | None], V]) -> tuple[V | None, V]:
        """Replace `key`'s value by `make(its value or None)`, as one step; returns (the old
        value, the new one)."""
        with self._lock:
            before = self._items.pop(key, None)
            now = self._items[key] = make(before)
            out = []
            while len(self._items) > self.most:
                out.append(self._items.pop(next(iter(self._items))))
        for value in out:
            if self.dropped is not None:
                self.dropped(value)
        return before, now

    def pop(self, key: K) -> V | None:
        with self._lock:
            return self._items.pop(key, None)

    def drop_where(self, keep: Callable[[K], bool]) -> None:
        """Forget every entry whose key `keep` refuses."""
        with self._lock:
            for key in [k for k in self._items if not keep(k)]:
                del self._items[key]

    def __len__(self) -> int:
        return len(self._items)


class Session:
    """The platform as this dashboard sees it: one client per token, and what never needs
    fetching twice."""

    def __init__(self, api_url: str):
        self.api_url = api_url
        self.clients: Recent[str, Client] = Recent(MAX_TABS, dropped=lambda c: c.close())
        # a finished evaluation's sample rows and resource graphs never change: kept, not fetched again
        self.finished: Recent[str, tuple[pd.DataFrame, tuple[pd.DataFrame, pd.DataFrame, str]]] = \
            Recent(FINISHED_KEPT)
        self.choices: Recent[str, list[tuple[str, str]]] = Recent(MAX_TABS)  # last offered to pick, per tab
        self.partial: Recent[str, tuple[int, pd.DataFrame]] = Recent(FINISHED_KEPT)  # rows so far, by progress

    def rows(self, client: Client, ev: Any) -> pd.DataFrame:
        """The first sample rows: all of a finished evaluation's, or those a running one has
        written so far (fetched again only when its progress moves)."""
        seen = self.partial.get(ev.id)
        if ev.status not in TERMINAL and seen is not None and seen[0] == ev.done_units:
            return seen[1]
        try:
            table = client.results(ev.id)
        except NotFoundError:
            frame = pd.DataFrame(columns=list(SAMPLE_COLUMNS))
        else:
            cols = [c for c in SAMPLE_COLUMNS if c in table.column_names]
            frame = table.select(cols).slice(0, SAMPLE_ROWS).to_pandas()
        if ev.status in TERMINAL:
            self.partial.pop(ev.id)
        else:
            self.partial.put(ev.id, (ev.done_units, frame))
        return frame

    def client(self, token: str) -> Client:
        """The token's client, kept for the `MAX_TABS` tokens used last (the oldest closed)."""
        if not token:
            raise ProctorError("sign in with an API token", status=401, code="unauthenticated")
        return self.clients.take(token, lambda kept: kept or Client(self.api_url, token=token, timeout=10))[1]

    def drop(self, token: str) -> None:
        """Forget a token's client (a refused token, or signing out)."""
        client = self.clients.pop(token)
        if client is not None:
            client.close()


class Sent:
    """What each browser tab was last sent by each refresher. An output equal to what the tab
    already shows goes as `gr.skip()`: neither the wire nor the page does any work for it (a
    finished evaluation's detail, quiet incidents, the unchanged graphs). A handler other
    than the refresher that changes one of its outputs must `forget` the tab. Every
    `full_every`-th answer goes whole: two answers of one refresher may cross on their way
    (a timer's and a click's), and the page then shows the older one until then."""

    def __init__(self, most: int, full_every: int = 15):
        self.full_every = full_every
        self.last: Recent[tuple[str, str], tuple[tuple[Any, ...], int]] = Recent(most)  # (outputs, answers)

    def changed(self, refresher: str, request: Any, outputs: tuple[Any, ...]) -> tuple[Any, ...]:
        tab = getattr(request, "session_hash", None)
        if tab is None:
            return outputs
        before, _ = self.last.take((refresher, tab), lambda kept: (outputs, (kept[1] if kept else 0) + 1))
        if before is None or len(before[0]) != len(outputs) or (before[1] + 1) % self.full_every == 0:
            return outputs
        return tuple(gr.skip() if _same(old, new) else new for old, new in zip(before[0], outputs))

    def forget(self, request: Any) -> None:
        tab = getattr(request, "session_hash", None)
        self.last.drop_where(lambda key: key[1] != tab)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, pd.DataFrame) or isinstance(b, pd.DataFrame):
        return isinstance(a, pd.DataFrame) and isinstance(b, pd.DataFrame) and a.equals(b)
    try:
        return type(a) is type(b) and bool(a == b)
    except (TypeError, ValueError):
        return False
