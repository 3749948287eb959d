"""A Ray job: sweep one suite over several model settings and compare the results.

Submit it to the running platform (after `proctor up`) with Ray's job API, from the
repository's folder:

    RAY_AUTH_MODE=token .venv/bin/ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python examples/ray_job_sweep.py --spec examples/arithmetic.yaml --error-rates 0 0.1 0.3

Inside the cluster the script joins Ray, submits one evaluation per setting to Proctor's
control plane, waits for them all, and prints one line per setting. Settings come from
the `PROCTOR_*` environment, as everywhere.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import ray

from eval_actors.control_plane import ControlPlane
from proctor.settings import load_settings
from proctor.spec import load_spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(Path(__file__).with_name("arithmetic.yaml")))
    ap.add_argument("--error-rates", type=float, nargs="+", default=[0.0, 0.1, 0.3])
    ap.add_argument("--owner", default="ray-job")
    args = ap.parse_args()

    settings = load_settings()
    ray.init(address="auto", namespace=settings.ray_namespace, logging_level="ERROR")
    plane = ControlPlane(settings)
    base = load_spec(args.spec)
    ids = {}
    for rate in args.error_rates:
        spec = base.model_copy(update={
            "name": f"{base.name}-err{rate:g}",
            "model": base.model.model_copy(update={"error_rate": rate}),
            "labels": {**base.labels, "sweep": "error_rate", "error_rate": f"{rate:g}"},
        })
        ids[rate] = plane.submit(spec, owner=args.owner)
    rows = []
    for rate, eval_id in ids.items():
        ev = plane.wait(eval_id, timeout=1800)
        first = next(iter(ev.summary["metrics"].values())) if ev.summary else {"mean": None}
        rows.append({"error_rate": rate, "eval_id": eval_id, "status": ev.status, "accuracy": first["mean"],
                     "results": ev.results_uri})
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
