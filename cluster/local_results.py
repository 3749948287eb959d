"""`proctor results` for an evaluation the platform does not know.

`proctor run` runs an evaluation on this machine without the platform: it writes the rows
to the results root of this machine's settings (`Settings.results`) and records nothing in
the platform's state, so the API answers 404 for its id (and is not even reachable when
the platform was never started). The CLI then reads the rows from that root, through this
module (entry point `proctor.results: local`), as `ResultsStore` reads any evaluation.
"""

from __future__ import annotations

import re

import pyarrow as pa

from proctor.settings import load_settings

from .results import ResultsStore

EVAL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # one folder name, never a path


def read(eval_id: str) -> tuple[pa.Table, str] | None:
    """The evaluation's rows and the URI of its folder, or None when the results root has
    no such evaluation. Raises `StorageError` (an `OSError`) when it has one that cannot
    be read, and `SettingsError` for a bad setting."""
    if not EVAL_ID.match(eval_id):
        return None
    settings = load_settings()
    store = ResultsStore(settings.results, settings)
    if not store.parts(eval_id):
        return None
    return store.read(eval_id), store.eval_uri(eval_id)
