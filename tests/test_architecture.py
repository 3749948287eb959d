"""The layers of DESIGN.md and the public face, checked."""

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
    assert proctor.__all__ == ["EvaluationSpec", "SpecError", "load_spec", "parse_spec", "Client", "AsyncClient",
                               "ProctorError", "__version__"]
    for name in proctor.__all__:
        assert getattr(proctor, name) is not None


def test_harness_start_imports_nothing_heavy() -> None:
    code = "import sys, proctor.harness.__main__; print(sorted(m for m in sys.modules if m.split('.')[0] in ('pydantic', 'yaml', 'ray', 'json')))"
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
