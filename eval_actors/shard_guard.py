"""The safety guard of one shard's sandbox: the policy's monitors (resources, syscalls)
wired to the sandbox, its rules (compiled once per policy), and the stop that kills it.

`limit_hit` turns a runtime's own hard stop (the kernel's OOM kill, the output cap, the
pids limit) into the violation it is, for a sandbox no monitor sampled in time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from cluster.runtimes import LaunchRequest, Sandbox, SandboxExit
from proctor.observability import tracing
from proctor.policy import SafetyPolicy
from safety.canaries import PATHS as CANARY_PATHS
from safety.guard import SafetyGuard
from safety.monitors import ResourceMonitor, disk_usage
from safety.rules import RuleSet
from safety.syscalls import SyscallMonitor
from safety.violations import Violation

log = logging.getLogger("proctor.executor")

GUARD_INTERVAL_S = 0.25  # monitors are polled this often (the policy's text rules act at once)
RESOURCE_EVERY_S = 0.5  # sandbox stats (gVisor: a `runsc events` call) at most this often
DISK_EVERY_S = 1.0  # the workspace's disk use at most this often
MAX_RULESETS = 64  # compiled policies kept


class RuleSets:
    """The compiled rules of the policies seen lately, by policy (compiling costs)."""

    def __init__(self) -> None:
        self._by_policy: dict[str, RuleSet] = {}

    def of(self, policy: SafetyPolicy) -> RuleSet:
        key = policy.model_dump_json()
        rules = self._by_policy.get(key)
        if rules is None:
            rules = self._by_policy[key] = RuleSet.of(policy)
            while len(self._by_policy) > MAX_RULESETS:
                self._by_policy.pop(next(iter(self._by_policy)))
        return rules


def sandbox_guard(policy: SafetyPolicy, request: LaunchRequest, sandbox: Sandbox, rules: RuleSet | None,
                  on_stop: Callable[[], None] | None = None) -> SafetyGuard:
    """A guard of `sandbox` under `policy`, not yet started. `rules=None`: no monitors and
    no rules (ONLY the baseline of benchmarks/safety_stop.py; the platform never does so).
    `on_stop` is called once the sandbox is killed by a stop (the evaluation's others)."""
    limits = request.limits
    disk = {"at": float("-inf"), "bytes": 0}

    async def sample() -> dict[str, float | None]:
        stats = await sandbox.stats()
        if time.monotonic() - disk["at"] >= DISK_EVERY_S:  # walking the workspace costs most
            disk["at"] = time.monotonic()
            disk["bytes"] = await asyncio.to_thread(disk_usage, request.workspace, 2 * limits.disk_bytes)
        return {"memory": stats.memory_bytes, "pids": stats.pids, "cpu_s": stats.cpu_seconds,
                "disk": disk["bytes"], "output": sandbox.output_bytes,
                "pids_refused": stats.pids_refused}

    async def stop(v: Violation) -> None:
        stopping = tracing.start("safety.stop", monitor=v.monitor, rule=v.rule, action=v.action)
        await sandbox.kill("killed", f"safety: {v.monitor}/{v.rule}: {v.message}")
        if on_stop is not None:
            on_stop()
        try:
            await asyncio.wait_for(sandbox.wait(), 10)
        except asyncio.TimeoutError:
            log.error("sandbox %s not dead 10 s after a safety stop", request.sandbox_id)
        stopping.end(error=f"safety stop by {v.monitor}/{v.rule}: {v.message}")

    if rules is None:
        return SafetyGuard(policy, [], stop, interval=GUARD_INTERVAL_S, rules=RuleSet([]))
    resource_limits = {"memory": limits.memory_bytes, "pids": limits.pids, "disk": limits.disk_bytes,
                       "output": limits.output_cap_bytes, "cpu_s": policy.resources.max_cpu_s}
    monitors: list[Any] = [ResourceMonitor(sample, resource_limits, policy.resources, every=RESOURCE_EVERY_S)]
    trace_log = sandbox.trace_log
    if trace_log is not None:
        monitors.append(SyscallMonitor(trace_log, list(request.trace_syscalls), policy.syscalls.action,
                                       CANARY_PATHS if policy.canaries else [], policy.canary_action))
    return SafetyGuard(policy, monitors, stop, interval=GUARD_INTERVAL_S, rules=rules)


def limit_hit(guard: SafetyGuard, exit_: SandboxExit) -> None:
    """A sandbox the runtime ended at a hard limit (the kernel's OOM kill, the output
    cap, the pids limit) broke the policy even when no monitor sampled it in time."""
    metric = {"oom": "memory", "output_cap": "output", "pids": "pids"}.get(exit_.reason)
    if metric is not None and guard.stopped is None:
        guard.report(Violation("resources", metric, guard.policy.resources.action,
                               f"the sandbox hit its {metric} limit and was killed by the runtime",
                               (exit_.detail,)))
