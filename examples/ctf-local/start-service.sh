#!/bin/sh
# Start the file service on 127.0.0.1:8080 (as the user running this: `ctf`), unless it
# already runs (every sample of a shard shares its sandbox), and wait until it answers.
# socat's -t: after the client's end of input, wait up to 10 s for the answer (its default,
# 0.5 s, cut answers short on a busy host).
nc -z 127.0.0.1 8080 2>/dev/null && exit 0
setsid socat -t 10 TCP-LISTEN:8080,bind=127.0.0.1,reuseaddr,fork EXEC:/srv/bin/serve >/dev/null 2>&1 < /dev/null &
for _ in $(seq 150); do nc -z 127.0.0.1 8080 2>/dev/null && exit 0; sleep 0.1; done
echo "the file service did not start" >&2
exit 1
