"""`python -S -B -m proctor.harness [--workspace PATH] [--sandboxed] [--service]`: run one shard
over stdin/stdout, or with `--service` serve exec and file requests (`proctor.requests`,
`proctor.harness.service`) until stdin ends.

Sandboxes start it as `python -S -B -c "$ENTRY" [...]` instead (`cluster.runtimes.layout`):
the same `run()`, without `-m`'s `runpy` and the modules it loads (~165 of the ~520 system
calls before the first line, each a round trip to the Sentry in gVisor).

`--sandboxed` is given by the runtime that started it in a sandbox of its own (its own pid
namespace, and as the sandbox's root where the agent's commands run as another user):
only then does the harness change users and kill the agent's processes.

The first line tells the supervisor that the sandbox is up and how long start-up took,
so it is written before anything heavy loads (`sys` only, the line pre-encoded);
pydantic and the rest of the harness are imported after it.
"""

import sys

TYPE_CHECKING = False  # not `typing`'s: importing typing costs the harness's start (see above)
if TYPE_CHECKING:
    from typing import BinaryIO

    from proctor.harness.channel import Channel

ENTRY = "from proctor.harness.__main__ import run; run()"  # the `-c` program that starts the harness
READY = b'{"v":2,"seq":0,"type":"log","level":"info","message":"harness ready (protocol 2)"}\n'


def main(argv: list[str] | None = None) -> int:
    out = sys.stdout.buffer
    out.write(READY)
    out.flush()

    import argparse
    import os
    from pathlib import Path

    from proctor.harness.channel import Channel, clip
    from proctor.harness.runner import run_shard
    from proctor.protocol import decode_in

    parser = argparse.ArgumentParser(prog="python -m proctor.harness", description=__doc__)
    parser.add_argument("--workspace", default="/workspace", help="writable directory for the samples (default /workspace)")
    parser.add_argument("--sandboxed", action="store_true", help="the harness runs in a sandbox of its own")
    parser.add_argument("--service", action="store_true", help="serve exec and file requests (Inspect's sandbox)")
    channel = Channel(out, first_seq=1, hard_exit=os._exit)
    try:
        args = parser.parse_args(argv)
    except SystemExit:
        channel.done("error", error="bad arguments; usage: python -m proctor.harness [--workspace PATH]")
        return 2

    stdin = sys.stdin.buffer
    if args.service:
        return _serve(channel, stdin, args.sandboxed)
    first = stdin.readline()
    try:
        if not first.strip():
            raise ValueError("stdin ended or sent an empty line before the shard message")
        message = decode_in(first)
        if message.type != "shard":
            raise ValueError(f"the first message must be 'shard', got {message.type!r}")
    except ValueError as exc:
        excerpt = first[:200].decode("utf-8", "replace")
        channel.done("error", error=clip(f"no shard to run: {exc}; first line: {excerpt!r}"))
        return 2
    channel.start_reader(stdin)
    return run_shard(message, channel, Path(args.workspace), sandboxed=args.sandboxed)


def _serve(channel: "Channel", stdin: "BinaryIO", sandboxed: bool) -> int:
    from proctor.harness.channel import clip
    from proctor.harness.service import serve
    from proctor.requests import decode_service

    first = stdin.readline()
    try:
        start = decode_service(first)
        if start.type != "service":
            raise ValueError(f"the first message must be 'service', got {start.type!r}")
    except ValueError as exc:
        channel.log("error", clip(f"no service to start: {exc}"))
        return 2
    return serve(start, channel, stdin, sandboxed)


def run() -> None:
    """`main()`, then exit the process at once."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # the stdin reader thread may hold stdin's lock; a normal shutdown could wait on it
    import os

    os._exit(code)


if __name__ == "__main__":
    run()
