"""A Ray worker node lost mid-run (tests/lostnodes.py, on a cluster of its own in a
subprocess): the shards it took with it are retried on the node that remains, within
their attempts; the GPU reservations of its shards are released; no row is doubled; and a
node that joins afterwards is used again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray
HERE = Path(__file__).parent


def test_a_lost_worker_node_loses_no_shard_and_doubles_no_row_and_a_new_node_is_used() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE),
                                                        os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(HERE / "lostnodes.py")], capture_output=True, text=True,
                          timeout=900, env=env, cwd=HERE.parent)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for ev in report["lost"] + report["back"]:
        assert ev["status"] == "succeeded", ev["error"]
        assert ev["rows"] == ev["distinct_rows"] == ev["expected_rows"] == ev["done_units"]
        assert all(s["status"] == "succeeded" and s["attempt"] < 3 for s in ev["shards"])
    lost = [s for ev in report["lost"] for s in ev["shards"]]
    retried = [s for s in lost if s["attempt"] > 0]
    assert retried, "no shard was running on the lost node"
    assert all(s["placement"] != report["lost_node"] for s in retried)  # they ran on the node that remained
    # the lost node's GPUs are gone with it; every reservation on the remaining node is released
    assert report["gpus_after"] == 2.0 and report["allocations_after"] == []
    assert report["placement_groups_left"] == []
    back = [s for ev in report["back"] for s in ev["shards"]]
    assert any(s["placement"] == report["new_node"] for s in back), "the new node's GPUs were not used"
    # the supervisor that was lost with its node waited for one, started on the new node and works again
    assert report["supervisor_nodes"]["proctor-supervisor-0"] == report["new_node"]
    assert any(s["supervisor"] == "proctor-supervisor-0" for s in back)
