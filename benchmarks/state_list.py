"""Listing evaluations from the state store: the listing's projection against whole rows.

`StateStore.list_evaluations` reads every column of a page of evaluations except the spec,
of which it reads only the parts a listing shows (`LISTED_SPEC`: the GPU request and the
dataset's path), extracted by the database. The baseline, in the same run on the same
rows, is what it did before: `SELECT *` with the whole spec, each turned into an
`Evaluation`. The gap grows with the size of the specs, so it is measured with inline
datasets of several sizes (an inline sample is ~110 bytes of JSON here).

SQLite in a temporary folder by default; `--url postgresql+psycopg://...` measures a
PostgreSQL database instead (its `proctor_bench_*` rows are deleted afterwards).

    .venv/bin/python benchmarks/state_list.py [--evals 1000] [--limit 500] [--samples 0,240,2000] \
        [--repeats 15] [--url URL]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import delete, or_, select  # noqa: E402

from cluster.state.models import Evaluation, EvaluationRow, NewShard  # noqa: E402
from cluster.state.store import StateStore  # noqa: E402

E = EvaluationRow.__table__


def spec_with(samples: int) -> dict[str, Any]:
    spec: dict[str, Any] = {"version": 1, "name": "bench", "model": {"adapter": "reference"},
                            "scorers": [{"type": "exact"}], "sandbox": {"gpu": {"count": 1, "type": "A100"}}}
    if samples:
        spec["dataset"] = {"samples": [{"id": str(i), "input": f"What is {i} plus {i}? Answer with a number.",
                                        "target": str(2 * i)} for i in range(samples)]}
    else:
        spec["dataset"] = {"path": "s3://bucket/suites/arithmetic.jsonl"}
    return spec


def whole_rows(store: StateStore, limit: int) -> list[Evaluation]:
    """The baseline: a page of whole rows, the spec included (what the listing read before)."""
    with store._tx() as conn:
        where = or_(E.c.name.icontains("proctor_bench", autoescape=True),
                    E.c.model.icontains("proctor_bench", autoescape=True))  # the listing's `text` filter
        rows = conn.execute(select(E).where(where).order_by(E.c.created_at.desc(), E.c.id.desc()).limit(limit)).all()
    return [Evaluation.from_row(r) for r in rows]


def timed(fn: Any, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--evals", type=int, default=1000)
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--samples", default="0,240,2000", help="inline samples per spec, one run each (0: a path)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--url", help="a PostgreSQL URL; default: SQLite in a temporary folder")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        url = args.url or f"sqlite:///{tmp}/state.db"
        print(f"state store: {'PostgreSQL' if args.url else 'SQLite'}; {args.evals} evaluations, "
              f"pages of {args.limit}, {args.repeats} repeats, medians")
        print(f"{'samples/spec':>12} {'spec KB':>8} {'whole rows ms':>14} {'listing ms':>11} {'ratio':>6}")
        for samples in (int(x) for x in args.samples.split(",")):
            with StateStore(url) as store:
                with store._tx(write=True) as conn:
                    conn.execute(delete(E).where(E.c.name == "proctor_bench"))
                spec = spec_with(samples)
                for i in range(args.evals):
                    store.create_evaluation(f"proctor_bench_{i:06d}", owner="bench", name="proctor_bench", spec=spec,
                                            model="reference", runtime="gvisor",
                                            shards=[NewShard("s0", ["0"], 1, {"cpus": 1.0})])
                listed = store.list_evaluations(text="proctor_bench", limit=args.limit)[0]
                assert len(listed) == min(args.limit, args.evals) and listed[0].spec["sandbox"]["gpu"]["count"] == 1
                base: list[float] = []
                ours: list[float] = []
                for _ in range(args.repeats):  # alternated, so that both share the machine's noise
                    base += timed(lambda: whole_rows(store, args.limit), 1)
                    ours += timed(lambda: store.list_evaluations(text="proctor_bench", limit=args.limit), 1)
                b, o = statistics.median(base) * 1000, statistics.median(ours) * 1000
                print(f"{samples:>12} {len(str(spec)) / 1024:>8.1f} {b:>14.1f} {o:>11.1f} {b / o:>6.2f}")
                with store._tx(write=True) as conn:
                    conn.execute(delete(E).where(E.c.name == "proctor_bench"))


if __name__ == "__main__":
    main()
