"""The queue of shards waiting for capacity: by priority, then fair between users, then age.

Within one priority level the queue interleaves users: the next candidate comes from the
user with the fewest shards running (counting those already picked in this pass), and
is that user's oldest waiting shard. So one user's thousand queued shards cannot starve
another user's one.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from .capacity import Demand


@dataclass(frozen=True)
class QueuedShard:
    eval_id: str
    shard_id: str
    owner: str
    priority: int
    demand: Demand
    attempt: int = 0
    order: int = field(default=0, compare=False)  # age: smaller is older
    queued_at: float = field(default_factory=time.time, compare=False)  # wall clock, when it was pushed


class ShardQueue:
    def __init__(self) -> None:
        self._levels: dict[int, dict[str, deque[QueuedShard]]] = defaultdict(lambda: defaultdict(deque))
        self._index: dict[tuple[str, str], QueuedShard] = {}
        self._counter = itertools.count()

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._index

    def push(self, shard: QueuedShard) -> None:
        key = (shard.eval_id, shard.shard_id)
        if key in self._index:
            return
        shard = QueuedShard(shard.eval_id, shard.shard_id, shard.owner, shard.priority, shard.demand,
                            shard.attempt, next(self._counter))
        self._index[key] = shard
        self._levels[shard.priority][shard.owner].append(shard)

    def remove(self, eval_id: str, shard_id: str) -> bool:
        shard = self._index.pop((eval_id, shard_id), None)
        if shard is None:
            return False
        users = self._levels[shard.priority]
        users[shard.owner].remove(shard)
        if not users[shard.owner]:
            del users[shard.owner]
        if not users:
            del self._levels[shard.priority]
        return True

    def remove_evaluation(self, eval_id: str) -> list[QueuedShard]:
        gone = [s for (e, _), s in list(self._index.items()) if e == eval_id]
        for s in gone:
            self.remove(s.eval_id, s.shard_id)
        return gone

    def oldest_wait_s(self) -> float:
        """How long the shard that has waited longest has waited (0 when none waits); the
        index is in push order, so that is its first entry."""
        oldest = next(iter(self._index.values()), None)
        return max(0.0, time.time() - oldest.queued_at) if oldest is not None else 0.0

    def waiting(self, eval_id: str) -> int:
        return sum(1 for (e, _) in self._index if e == eval_id)

    def candidates(self, running_by_owner: dict[str, int]) -> Iterator[QueuedShard]:
        """Every queued shard once, in admission order (see the module's docstring).
        Do not push or remove while iterating: collect, then change."""
        for priority in sorted(self._levels, reverse=True):
            users = self._levels[priority]
            cursor = {owner: 0 for owner in users}
            heap = [(running_by_owner.get(owner, 0), q[0].order, owner) for owner, q in users.items()]
            heapq.heapify(heap)
            while heap:
                count, _, owner = heapq.heappop(heap)
                q = users.get(owner)
                i = cursor[owner]
                if q is None or i >= len(q):
                    continue
                shard = q[i]
                cursor[owner] = i + 1
                yield shard
                if owner in self._levels.get(priority, {}) and cursor[owner] < len(self._levels[priority][owner]):
                    nxt = self._levels[priority][owner][cursor[owner]]
                    heapq.heappush(heap, (count + 1, nxt.order, owner))
