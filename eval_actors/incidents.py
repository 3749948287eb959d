"""A shard's safety violations, recorded as incidents: stored, published on the event
bus, and alerted on (`stop` and `alert` actions) through the platform's webhooks."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from proctor.bus_events import IncidentEvent, event
from proctor.jsontypes import JsonObject
from safety.alerts import AlertSink
from safety.incident import evidence_of

from .metrics import record_violation
from .shard_work import ShardOutcome

log = logging.getLogger("proctor.supervisor")


async def record_incidents(db: Any, alerts: AlertSink, publish: Callable[[list[JsonObject]], None],
                           eval_id: str, shard_id: str, outcome: ShardOutcome) -> list[JsonObject]:
    """Record each safety violation of the shard as an incident (`db`: the store, called
    off the event loop), publish it, and alert on `stop` and `alert` ones. Returns them as
    dicts. One that cannot be stored is logged and left out (it is also in the quarantine
    report and the log)."""
    safety = outcome.safety.as_dict()
    out = []
    for v in outcome.safety.violations:
        evidence = evidence_of(v, safety, outcome.safety.started_at)
        evidence["stopped_the_shard"] = v == outcome.safety.stopped_by
        try:
            inc = await db.add_incident(eval_id, rule=f"{v['monitor']}/{v['rule']}", severity=v["severity"],
                                        action=v["action"], evidence=evidence, shard_id=shard_id)
        except Exception:
            log.exception("could not record an incident of %s/%s", eval_id, shard_id)
            continue
        item: JsonObject = {"id": inc.id, "eval_id": eval_id, "shard_id": shard_id, "rule": inc.rule,
                            "severity": inc.severity, "action": inc.action, "evidence": evidence,
                            "created_at": inc.created_at.isoformat()}
        out.append(item)
        record_violation(inc.rule, inc.action)
        publish([event(IncidentEvent(**item))])
        if v["action"] in ("stop", "alert"):
            alerts.send(item)
    return out
