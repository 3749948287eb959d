"""A new user's first run is quiet: installing Proctor as scripts/setup.sh does prints no
warning that the user did not cause (setuptools' deprecation of the `license` table, its
note that an editable install is one)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _setup_install_env() -> dict[str, str]:
    """The variables scripts/setup.sh sets on its `pip install -e` line."""
    (line,) = [x for x in (REPO / "scripts" / "setup.sh").read_text().splitlines()
               if "pip install -q -e" in x]
    words = shlex.split(line)
    return dict(w.split("=", 1) for w in words[: next(i for i, w in enumerate(words) if "=" not in w)])


def test_installing_proctor_as_setup_does_prints_no_warning(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    # this machine's own pip configuration (extra indexes, find-links) is no user's
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(_setup_install_env(), PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], env=env, check=True, capture_output=True, timeout=600)  # as setup.sh
    done = subprocess.run([*pip, "--no-deps", "-e", str(REPO)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not re.search(r"(?i)warning|deprecat", done.stdout + done.stderr), done.stdout + done.stderr
