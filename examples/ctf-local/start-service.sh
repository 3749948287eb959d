#!/bin/sh
# Start the file service on 127.0.0.1:8080 (as the user running this: `ctf`), unless it
# already runs (every sample of a shard shares its sandbox), and wait until it answers.
nc -z 127.0.0.1 8080 2>/dev/null && exit 0
setsid socat TCP-LISTEN:8080,bind=127.0.0.1,reuseaddr,fork EXEC:/srv/bin/serve >/dev/null 2>&1 < /dev/null &
for _ in $(seq 50); do nc -z 127.0.0.1 8080 2>/dev/null && exit 0; sleep 0.1; done
echo "the file service did not start" >&2
exit 1
