"""First import of an image: the store's checked, verified unpack against `tar -x`.

Measured in the same run, alternated, on the same generated image (an OCI layout of a
few hundred MB in three gzip layers: many small files, a few large ones, a mix of
compressible text and incompressible bytes):
  proctor  — `ImageStore.import_archive()` into an empty store: every member checked,
             written without following links, blobs and diff_ids verified while
             streaming, the image committed;
  baseline — `tar -x` (GNU tar, gzip through `tar -z`, as root: owners kept) of the same
             layer blobs, one after the other, into an empty folder; nothing checked.
Prints each run's wall time and CPU time (this process for proctor, tar's and gzip's for
the baseline), the medians in MB/s of uncompressed layer data, the ratio proctor/tar of the
medians and the median of the ratios within each repeat (the two runs of a repeat are
next to each other in time: on a shared machine, that one moves less with the load).

    .venv/bin/python benchmarks/image_unpack.py [--mb 300] [--repeats 3] [--compression gzip|zstd|none]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from cluster.images import ImageLimits, ImageStore  # noqa: E402
from imagearchives import ImageDef, file, folder, layer, oci_layout, symlink  # noqa: E402

WORDS = b"the quick brown fox jumps over the lazy dog while evaluating dangerous capabilities safely "


def content(rng: random.Random, size: int) -> bytes:
    """Half text (compresses well), half random bytes (does not): like binaries and data."""
    text = (WORDS * (size // len(WORDS) + 1))[: size // 2]
    return text + rng.randbytes(size - len(text))


def generate(total_mb: int, compression: str | None) -> ImageDef:
    rng = random.Random(13)
    budget = total_mb * 1024**2
    small = [folder("usr"), folder("usr/lib"), symlink("lib", "usr/lib")]
    for d in range(40):
        small.append(folder(f"usr/lib/pkg{d}"))
        for f in range(int(budget * 0.3) // (40 * 16 * 1024)):
            small.append(file(f"usr/lib/pkg{d}/mod{f}.py", content(rng, rng.randint(1024, 31 * 1024)),
                              mode=0o644 if f % 7 else 0o755))
    large = [folder("opt"), folder("opt/models")]
    for f in range(int(budget * 0.6) // (8 * 1024**2)):
        large.append(file(f"opt/models/weights{f}.bin", content(rng, 8 * 1024**2)))
    tail = [folder("srv", uid=1000, gid=1000)]
    for f in range(int(budget * 0.1) // (4 * 1024)):
        tail.append(file(f"srv/cfg{f}.txt", content(rng, 4096), uid=1000, gid=1000))
    return ImageDef([layer(*small, compression=compression), layer(*large, compression=compression),
                     layer(*tail, compression=compression)])


def run_proctor(layout: Path, work: Path) -> tuple[float, int]:
    """Seconds, and the image's uncompressed layer bytes."""
    store = ImageStore(work / "store", ImageLimits(image_bytes=64 * 1024**3, layer_bytes=64 * 1024**3))
    t0 = time.perf_counter()
    image = store.import_archive(layout)
    return time.perf_counter() - t0, image.size_bytes


def run_tar(blobs: list[Path], work: Path, compression: str | None) -> float:
    dest = work / "tar"
    dest.mkdir()
    flags = {"gzip": ["-z"], "zstd": ["--zstd"], None: []}[compression]
    t0 = time.perf_counter()
    for blob in blobs:
        subprocess.run(["tar", "-x", *flags, "--numeric-owner", "-f", str(blob), "-C", str(dest)], check=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=300, help="uncompressed size of the image (default 300)")
    parser.add_argument("--repeats", type=int, default=3, help="imports each way, alternated (default 3)")
    parser.add_argument("--compression", choices=["gzip", "zstd", "none"], default="gzip")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: imports keep the image's owners")
    compression = None if args.compression == "none" else args.compression
    root = Path(tempfile.mkdtemp(prefix="proctor-bench-unpack-"))
    try:
        t0 = time.perf_counter()
        image = generate(args.mb, compression)
        layout = oci_layout(root / "layout", image)
        blobs = [layout / "blobs/sha256" / b.digest.removeprefix("sha256:") for b in image.layers]
        packed = sum(len(b.data) for b in image.layers)
        warm, plain = run_proctor(layout, root / "warm-up")  # also reads the archive into the page cache
        shutil.rmtree(root / "warm-up")
        print(f"image: {len(image.layers)} {args.compression} layers, {plain / 1e6:.0f} MB uncompressed, "
              f"{packed / 1e6:.0f} MB in the archive (generated in {time.perf_counter() - t0 - warm:.1f} s; "
              f"a first import to warm the page cache: {warm:.2f} s)")
        del image
        times: dict[str, list[float]] = {"proctor": [], "tar -x": []}
        cpu: dict[str, list[float]] = {"proctor": [], "tar -x": []}
        for i in range(args.repeats):
            for side in (("proctor", "tar -x") if i % 2 == 0 else ("tar -x", "proctor")):
                work = root / f"run-{i}-{side.replace(' ', '')}"
                work.mkdir()
                who = resource.RUSAGE_SELF if side == "proctor" else resource.RUSAGE_CHILDREN
                before = resource.getrusage(who)
                seconds = run_proctor(layout, work)[0] if side == "proctor" else run_tar(blobs, work, compression)
                after = resource.getrusage(who)
                used = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
                times[side].append(seconds)
                cpu[side].append(used)
                print(f"  run {i + 1} {side:8} {seconds:6.2f} s  {plain / 1e6 / seconds:7.1f} MB/s  cpu {used:5.2f} s")
                shutil.rmtree(work)
        med = {side: statistics.median(values) for side, values in times.items()}
        pairs = statistics.median(t / p for t, p in zip(times["tar -x"], times["proctor"]))
        print(f"median: proctor {plain / 1e6 / med['proctor']:.1f} MB/s ({med['proctor']:.2f} s, cpu "
              f"{statistics.median(cpu['proctor']):.2f} s), tar -x {plain / 1e6 / med['tar -x']:.1f} MB/s "
              f"({med['tar -x']:.2f} s, cpu {statistics.median(cpu['tar -x']):.2f} s)")
        print(f"ratio proctor/tar (throughput): {med['tar -x'] / med['proctor']:.2f} of the medians, "
              f"{pairs:.2f} within repeats (median); cpu tar/proctor "
              f"{statistics.median(cpu['tar -x']) / statistics.median(cpu['proctor']):.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
