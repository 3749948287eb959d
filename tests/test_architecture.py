"""The layers of docs/architecture.md and the public face, checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import proctor

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold() -> None:
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint), "--config", str(ROOT / ".importlinter")], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" not in result.stdout.lower().replace("0 broken", "")


def test_public_face_is_declared() -> None:
    import proctor.client
    import proctor.spec

    for name in proctor.__all__:
        assert getattr(proctor, name) is not None
    errors = {name for name, value in vars(proctor.client).items()
              if isinstance(value, type) and issubclass(value, proctor.client.ProctorError)}
    assert errors <= set(proctor.__all__), "every error the client raises is exported from proctor"
    assert {"Client", "AsyncClient", "Evaluation", "EvaluationSpec", "load_spec", "parse_spec"} <= set(proctor.__all__)
    assert "ValidationError" not in proctor.__all__  # pydantic's name; the client's 422 is InvalidRequestError
    assert isinstance(proctor.client.error_of(422, {}), proctor.InvalidRequestError)


def test_one_vocabulary_of_statuses() -> None:
    from cluster.state.models import EVALUATION_STATUSES, SHARD_STATUSES, TRANSITIONS
    from proctor.statuses import STATUSES, TERMINAL
    from proctor.statuses import SHARD_STATUSES as SHARDS

    assert set(EVALUATION_STATUSES) == set(STATUSES) and set(SHARD_STATUSES) == set(SHARDS)
    assert {s for s, targets in TRANSITIONS["evaluation"].items() if not targets} == TERMINAL
    dashboard = (ROOT / "ui" / "dashboard.py").read_text()
    assert "STATUSES" in dashboard and '"safety_stopped"' not in dashboard  # offers every status, from the one list


def test_harness_start_imports_nothing_heavy() -> None:
    code = "import sys, proctor.harness.__main__; print(sorted(m for m in sys.modules if m.split('.')[0] in ('pydantic', 'yaml', 'ray', 'json')))"
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
