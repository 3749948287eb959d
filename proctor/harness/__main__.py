"""`python -S -B -m proctor.harness [--workspace PATH]`: run one shard over stdin/stdout.

The first line tells the supervisor that the sandbox is up and how long start-up took,
so it is written before anything heavy loads (`sys` only, the line pre-encoded);
pydantic and the rest of the harness are imported after it.
"""

import sys

READY = b'{"v":1,"seq":0,"type":"log","level":"info","message":"harness ready (protocol 1)"}\n'


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
    channel = Channel(out, first_seq=1, hard_exit=os._exit)
    try:
        args = parser.parse_args(argv)
    except SystemExit:
        channel.done("error", error="bad arguments; usage: python -m proctor.harness [--workspace PATH]")
        return 2

    stdin = sys.stdin.buffer
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
    return run_shard(message, channel, Path(args.workspace))


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # the stdin reader thread may hold stdin's lock; a normal shutdown could wait on it
    import os

    os._exit(code)
