"""Launch in a task's image against launch on the host's userland, same limits, same runtime.

Measured in the same run, interleaved, from `runtime.launch()` to the harness's first
protocol event (`harness ready`):
  image    — the harness injected into an imported image (busybox alone: no Python, no C
             library), the image already unpacked (warm: what every launch but the first costs);
  baseline — the default: an empty root with the host's /usr bound into it.
Prints both medians, p90s and their ratio. Goal: ratio <= 1.1. Leaves nothing behind.

    .venv/bin/python benchmarks/image_launch.py [--runs 20] [--runtime gvisor|bubblewrap]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import os
import platform
import shutil
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

from cluster.images import ImageStore
from cluster.runtimes import LaunchRequest, SandboxLimits, select_runtime
from cluster.runtimes.layout import harness_layout, injected_layout

TOOLS = ("sh", "ls", "cat", "echo")


def busybox_layout(folder: Path) -> Path:
    """An OCI image layout of one layer: /bin/busybox (static) and a few of its names."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        for name in ("bin", "etc"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        tar.add("/bin/busybox", "bin/busybox")
        for tool in TOOLS:
            info = tarfile.TarInfo(f"bin/{tool}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
    blobs = folder / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return f"sha256:{digest}"

    data = layer.getvalue()
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    config = json.dumps({"architecture": arch, "os": "linux", "config": {"Env": ["PATH=/bin"]},
                         "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(data).hexdigest()}"]}}
                        ).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": blob(config), "size": len(config)},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                                       "digest": blob(data), "size": len(data)}]}).encode()
    index = {"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                                               "digest": blob(manifest), "size": len(manifest)}]}
    (folder / "index.json").write_text(json.dumps(index))
    (folder / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    return folder


async def first_event(runtime, request: LaunchRequest) -> float:  # noqa: ANN001
    started = time.perf_counter()
    sandbox = await runtime.launch(request)
    try:
        async for _event in sandbox.events():
            return time.perf_counter() - started
        raise RuntimeError(f"no event: {(await sandbox.wait()).stderr_tail}")
    finally:
        await sandbox.kill()
        await sandbox.wait()
        await sandbox.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--runtime", choices=["gvisor", "bubblewrap"], default="gvisor")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="proctor-bench-image-"))
    root.chmod(0o711)
    try:
        store = ImageStore(root / "images")
        started = time.perf_counter()
        image = store.import_archive(busybox_layout(root / "layout"), name="bench:1")
        imported = time.perf_counter() - started
        runtime = select_runtime(args.runtime, root / args.runtime)
        weak = runtime.isolation == "weak"
        plans = {"image": (injected_layout(weak), image.rootfs), "baseline": (harness_layout(weak), None)}
        times: dict[str, list[float]] = {name: [] for name in plans}
        for i in range(args.runs + 1):
            for name, (layout, rootfs) in plans.items():
                ws = root / f"ws-{name}-{i}"
                ws.mkdir()
                os.chown(ws, 65534, 65534)
                request = LaunchRequest(f"bench-{name}-{i}", layout.argv("--sandboxed"), ws,
                                        SandboxLimits(timeout_s=60), layout.env, layout.ro_binds, rootfs=rootfs)
                took = asyncio.run(first_event(runtime, request))
                if i:  # the first of each warms caches
                    times[name].append(took)
                shutil.rmtree(ws)
        print(f"runtime {args.runtime}, {args.runs} launches each, interleaved; import of the image: {imported:.3f}s")
        for name, values in times.items():
            q = statistics.quantiles(values, n=10)
            print(f"  {name:8s} p50 {statistics.median(values) * 1000:7.1f} ms   p90 {q[-1] * 1000:7.1f} ms")
        ratio = statistics.median(times["image"]) / statistics.median(times["baseline"])
        print(f"ratio image / baseline (p50): {ratio:.2f}  (goal <= 1.1)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
