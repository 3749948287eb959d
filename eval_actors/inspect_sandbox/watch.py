"""The safety monitors over one service's sandbox, as over a shard's.

A `ServiceWatch` runs the policy's `SafetyGuard`: the resource monitor polls the sandbox
(memory, processes, CPU, workspace disk, channel output) and the text rules check every
command before it is sent and every output that comes back. A `stop` violation kills the
sandbox at once and writes an incident (JSON, under the provider's `incidents/` folder);
from then on every request of the sample fails with `SafetyStopped`, which names the
incident, and Inspect records it as the sample's error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import shlex
import time
import uuid
from pathlib import Path
from typing import Any

from proctor.policy import SafetyPolicy
from safety.guard import SafetyGuard
from safety.monitors import ResourceMonitor, disk_usage
from safety.rules import RuleSet
from safety.violations import Violation

log = logging.getLogger("proctor.inspect_sandbox")
INTERVAL_S = 0.25
RESOURCE_EVERY_S = 2.0  # a `runsc events` per sandbox; an Inspect worker watches many at once
DISK_EVERY_S = 5.0


class SafetyStopped(RuntimeError):
    """A safety monitor stopped the sample's sandbox. Raised by every request of the
    sample after the stop; Inspect records it as the sample's error (it names the incident)."""


class ServiceWatch:
    def __init__(self, policy: SafetyPolicy, sandbox: Any, service: str, incidents: Path):
        self.policy = policy
        self.sandbox = sandbox
        self.service = service
        self.incidents = incidents
        self.incident_id = uuid.uuid4().hex[:12]  # the name of its incident, if it ever has one
        self.started = time.time()
        limits = sandbox.request.limits
        disk = {"at": float("-inf"), "bytes": 0}

        async def sample() -> dict[str, float | None]:
            stats = await sandbox.stats()
            if time.monotonic() - disk["at"] >= DISK_EVERY_S:
                disk["at"] = time.monotonic()
                disk["bytes"] = await asyncio.to_thread(disk_usage, sandbox.request.workspace, 2 * limits.disk_bytes)
            return {"memory": stats.memory_bytes, "pids": stats.pids, "cpu_s": stats.cpu_seconds,
                    "disk": disk["bytes"], "output": getattr(sandbox, "output_bytes", None),
                    "pids_refused": stats.pids_refused}

        resource_limits = {"memory": limits.memory_bytes, "pids": limits.pids, "disk": limits.disk_bytes,
                           "output": limits.output_cap_bytes, "cpu_s": policy.resources.max_cpu_s}
        monitors = [ResourceMonitor(sample, resource_limits, policy.resources, every=RESOURCE_EVERY_S)]
        self.guard = SafetyGuard(policy, monitors, self._stop, interval=INTERVAL_S, rules=RuleSet.of(policy))

    def start(self) -> None:
        self.guard.start()

    async def close(self) -> None:
        await self.guard.close()

    @property
    def reason(self) -> str | None:
        """Why the sandbox was stopped, naming the incident; None if it was not."""
        v = self.guard.stopped
        if v is None:
            return None
        return (f"Proctor's safety monitors stopped service {self.service!r} (incident {self.incident_id}): "
                f"{v.monitor}/{v.rule}: {v.message}")

    async def check_command(self, argv: list[str]) -> None:
        """Check a command before it runs. Raises `SafetyStopped` if it stops the sample."""
        self.raise_if_stopped()
        found = self.guard.observe("command", shlex.join(argv))
        if self.guard.blocks(found):
            await self.guard.wait_stopped()
            self.raise_if_stopped()

    async def check_output(self, text: str) -> None:
        """Check what a command wrote. Raises `SafetyStopped` if it stops the sample."""
        found = self.guard.observe("output", text)
        if self.guard.blocks(found):
            await self.guard.wait_stopped()
            self.raise_if_stopped()

    def raise_if_stopped(self) -> None:
        if self.reason is not None:
            raise SafetyStopped(self.reason)

    async def _stop(self, v: Violation) -> None:
        await self.sandbox.kill("killed", f"safety: {v.monitor}/{v.rule}: {v.message}")
        try:
            await asyncio.wait_for(self.sandbox.wait(), 10)
        except asyncio.TimeoutError:
            log.error("sandbox %s not dead 10 s after a safety stop", self.sandbox.id)
        record = {"id": self.incident_id, "service": self.service, "sandbox_id": self.sandbox.id,
                  "runtime": self.sandbox.runtime, "started_at": self.started, "killed_at": time.time(),
                  "violation": dataclasses.asdict(v),
                  "violations": [dataclasses.asdict(x) for x in self.guard.violations]}
        try:
            self.incidents.mkdir(parents=True, exist_ok=True)
            (self.incidents / f"{self.incident_id}.json").write_text(json.dumps(record, indent=1, default=str))
        except OSError as exc:
            log.error("incident %s could not be written: %s", self.incident_id, exc)
        log.warning("%s", self.reason)
