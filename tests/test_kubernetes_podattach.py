"""The pod's attach stream (`cluster/runtimes/podattach.py`) without a server: what it puts
on the WebSocket."""

from __future__ import annotations

import asyncio

from cluster.runtimes.podattach import FRAME_BYTES, STDIN, PodChannel


class SlowSocket:
    """Records each message; yields to the event loop on every send, as a socket does."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def send(self, message: bytes) -> None:
        await asyncio.sleep(0)
        self.sent.append(message)


def test_concurrent_lines_reach_stdin_whole_and_one_after_another() -> None:
    ws = SlowSocket()
    channel = PodChannel(ws)  # type: ignore[arg-type]
    lines = [bytes([ord("a") + i]) * (3 * FRAME_BYTES + 7) + b"\n" for i in range(3)]

    async def go() -> list[bool]:
        return await asyncio.gather(*(channel.write(line) for line in lines))

    assert asyncio.run(go()) == [True, True, True]
    assert all(m[0] == STDIN and len(m) <= FRAME_BYTES + 1 for m in ws.sent)
    stdin = b"".join(m[1:] for m in ws.sent)
    assert stdin == b"".join(lines)  # no line split by another's pieces
