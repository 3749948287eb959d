"""Stage timings in the API's shard and sample views, from the results' rows.

Each sample row carries the seconds each of its stages took (`stages`: setup, eval, score,
cleanup, as the harness measured them) and the stage its error happened in
(`failed_stage`). The shard view sums them per shard (`ShardStages`); the sample view
(`GET .../results`) gives each row's `stages` as an object instead of Arrow's list of pairs.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from pydantic import BaseModel, Field

STAGES = ("setup", "eval", "score", "cleanup")


class ShardStages(BaseModel):
    stages: dict[str, float] = Field(default_factory=dict, description="seconds each stage took, summed over the "
                                     "shard's sample rows so far (setup, eval, score, cleanup)")
    failed_stages: dict[str, int] = Field(default_factory=dict, description="how many of its sample rows failed "
                                          "in each stage")


def as_object(pairs: Any) -> dict[str, float]:
    """A map column's value (Arrow gives a list of (key, value) pairs) as an object, in stage order."""
    found = dict(pairs or ())
    return {k: float(found[k]) for k in (*STAGES, *sorted(set(found) - set(STAGES))) if k in found}


def shard_stages(table: pa.Table | None) -> dict[str, ShardStages]:
    """shard id → its stage timings and failures, from the evaluation's rows (None: none yet)."""
    if table is None or not table.num_rows:
        return {}
    found: dict[str, ShardStages] = {}
    columns = table.select(["shard_id", "stages", "failed_stage"]).to_pydict()
    for shard, pairs, failed in zip(columns["shard_id"], columns["stages"], columns["failed_stage"]):
        into = found.setdefault(shard, ShardStages())
        for stage, seconds in as_object(pairs).items():
            into.stages[stage] = round(into.stages.get(stage, 0.0) + seconds, 6)
        if failed:
            into.failed_stages[failed] = into.failed_stages.get(failed, 0) + 1
    for into in found.values():
        into.stages = as_object(into.stages.items())
    return found


def with_stage_objects(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for row in rows:
        if "stages" in row:
            row["stages"] = as_object(row["stages"])
    return rows
