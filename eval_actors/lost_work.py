"""Which shards the supervisors still run, told apart from the ones that a lost actor or a
lost node took with it.

A supervisor that answers lists its running shards. One whose actor died (its process
crashed, or the Ray node under it was removed or preempted) cannot answer: Ray restarts it
on another node that can hold it, or keeps it pending until one joins, and a restarted
supervisor kills what its previous life left, so none of its shards runs any more: they
are lost, and the scheduler retries them (bounded by their attempts) on the nodes that
remain. One that is merely slow (a loaded host) is not taken for dead: the round is
skipped, as retrying the shards of a live supervisor would run them twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from ray.exceptions import RayActorError

ANSWER_S = 10.0


def actor_state(handle: Any) -> str:
    """The actor's state in Ray's GCS (ALIVE, RESTARTING, PENDING_CREATION, DEAD), read
    without calling it: a call to a restarting actor waits until it is back."""
    from ray._private import state

    return str(state.actors(actor_id=handle._actor_id.hex()).get("State", "DEAD"))


async def supervisors_live(actor: Callable[[str], Any], names: list[str],
                           ) -> tuple[set[tuple[str, str]] | None, set[str]]:
    """The (eval id, shard id) of every shard the live supervisors run, and the names of
    the supervisors that are down (their actor died, is restarting or waits for a node).
    The set is None when a live supervisor did not answer in time: nothing is known."""
    async def ask(name: str) -> list[Any] | str:
        try:
            handle = actor(name)
            if await asyncio.to_thread(actor_state, handle) != "ALIVE":
                return "down"
            return await asyncio.wait_for(handle.running_shards.remote(), ANSWER_S)
        except (RayActorError, ValueError):  # it died meanwhile, or there is no such actor
            return "down"
        except asyncio.TimeoutError:
            return "slow"

    answers = await asyncio.gather(*(ask(n) for n in names))
    live: set[tuple[str, str]] = set()
    down = {name for name, answer in zip(names, answers) if answer == "down"}
    if "slow" in answers:
        return None, down
    for answer in answers:
        if not isinstance(answer, str):
            live |= {tuple(k) for k in answer}
    return live, down
