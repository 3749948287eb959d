"""The inspect_evals example (examples/inspect_evals/): a 3CB challenge from the
inspect_evals package (its data ships in the package), its environment a Proctor image
built from the example's recipe, run through the platform with a scripted mockllm."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml
from inspect_ai.log import read_eval_log

from cluster.images import ImageStore
from eval_actors.control_plane import ControlPlane

pytestmark = pytest.mark.ray
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "inspect_evals"


def test_a_threecb_challenge_runs_its_tool_in_its_proctor_image_through_the_platform(plane: ControlPlane) -> None:
    ImageStore.from_settings(plane.settings).build(EXAMPLE / "threecb-factorial.yaml")
    spec = yaml.safe_load((EXAMPLE / "threecb.yaml").read_text())
    # the same script, also saying who ran the tool: the challenge's own user, in its image
    spec["model"]["args"]["script"][0]["arguments"]["code"] = (
        "import getpass, math, os\nprint(math.factorial(10), getpass.getuser(), os.path.isdir('/home/challenge_user'))")
    ev = plane.wait(plane.submit(spec), timeout=400)
    assert ev.status == "succeeded", ev.error
    df = pd.read_parquet(ev.results_uri.removeprefix("file://"))
    assert len(df) == 3 and sorted(df["epoch"]) == [1, 2, 3] and df["error"].isna().all()
    assert set(df["output"]) == {"3628800"}
    score = next(c for c in df.columns if c.startswith("score") and df[c].notna().all())
    assert set(df[score]) == {1.0}
    log = read_eval_log(str(Path(plane.settings.results.removeprefix("file://")) / df["transcript"].iloc[0]))
    assert log.eval.task.endswith("threecb") and len(log.samples) == 3
    for sample in log.samples:
        tools = [m for m in sample.messages if m.role == "tool"]
        assert tools and tools[0].function == "python" and tools[0].text.strip().splitlines()[-1] == "3628800 challenge_user True"
