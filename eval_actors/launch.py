"""What a shard's sandbox is launched with: its limits, the harness (on the host's userland,
or injected into the spec's image), the image's root, and who the agent is.

An image is looked up in the image store by its reference, checked to be one this host
can run the harness in (`image_problem`), and leased for as long as the sandbox lives, so
that garbage collection leaves it alone. The agent runs as `sandbox.user`, else the
image's own user when that is not root, else nobody; its environment is the image's.

A runtime whose nodes pull images (kubernetes) gets the image by a digest-pinned reference
(`pinned_reference`) instead of a root filesystem, and injects the harness itself. The
store is then asked only for the image's settings (its user, environment and platform):
an image it does not hold runs by its pinned reference with the defaults (nobody, no
environment of the image's).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from cluster.runtimes import LaunchRequest, SandboxLimits, SandboxRuntime
from cluster.runtimes.layout import SANDBOX_USER, harness_layout, injected_layout
from proctor.imageref import parse_image_ref
from proctor.protocol import AgentSpec
from proctor.spec import EvaluationSpec

NOBODY = f"{SANDBOX_USER}:{SANDBOX_USER}"
ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64"}  # the kernel's names → OCI's
MAX_LINKS = 40  # symlinks followed in an image's root before giving up (as the kernel does)


class ImageRefused(ValueError):
    """The spec's image is not in the store, or the harness cannot run in it. Caught by
    the shard executor: a failed shard whose error names the image and why."""


@dataclass(frozen=True)
class SandboxPlan:
    request: LaunchRequest
    agent: AgentSpec
    image: Any = None  # cluster.images.Image, leased by the caller while the sandbox lives


def plan_sandbox(spec: EvaluationSpec, runtime: SandboxRuntime, images: Any, sandbox_id: str, workspace: Path,
                 traced: tuple[str, ...], labels: tuple[tuple[str, str], ...]) -> SandboxPlan:
    """The launch request and the agent of one shard. Raises `ImageRefused`."""
    box = spec.sandbox
    pulled = runtime.pulls_images and box.image is not None
    if pulled:
        image, reference = pulled_image(box.image, images, spec.agentic)
    else:
        image, reference = (_image(box.image, images, spec.agentic, runtime) if box.image else None), None
    unprivileged = runtime.isolation == "weak"
    layout = injected_layout(unprivileged) if image is not None and not pulled else harness_layout(unprivileged)
    request = LaunchRequest(
        sandbox_id=sandbox_id,
        argv=layout.argv(*(["--sandboxed"] if runtime.harness_root else [])),
        workspace=workspace,
        limits=SandboxLimits(cpus=box.cpus, memory_bytes=box.memory, pids=box.pids, timeout_s=box.timeout_s,
                             output_cap_bytes=box.output_cap, disk_bytes=box.disk),
        env=layout.env,
        ro_binds=layout.ro_binds,
        rootfs=image.rootfs if image is not None and not pulled else None,
        image=reference,
        trace_syscalls=traced,
        gpus=box.gpu.count,
        gpu_type=box.gpu.type,
        egress=tuple(box.egress),
        labels=labels,
    )
    config = image.config if image is not None else None
    own = config.user if config is not None and config.user and config.user.partition(":")[0] not in ("root", "0") \
        else None
    agent = AgentSpec(user=box.user or own or NOBODY, env=dict(config.env) if config is not None else {})
    return SandboxPlan(request, agent, image)


def _image(ref: str, images: Any, agentic: bool, runtime: SandboxRuntime) -> Any:
    if not runtime.shares_workspace:  # refused rather than run in another image than the one asked for
        raise ImageRefused(f"sandbox.image {ref!r}: the {runtime.name} runtime does not run task images")
    if images is None:
        raise ImageRefused(f"sandbox.image {ref!r}: this platform has no image store")
    from cluster.images import ImageError

    try:
        image = images.resolve(ref)
    except ImageError as exc:
        raise ImageRefused(f"sandbox.image: {exc}") from None
    problem = image_problem(image, agentic)
    if problem is not None:
        raise ImageRefused(f"sandbox.image {ref!r} ({image.digest[:19]}): {problem}")
    return image


def pulled_image(ref: str, images: Any, agentic: bool) -> tuple[Any, str]:
    """The store's image `ref` names (None if the store has none, or does not hold it) and
    the digest-pinned reference a node pulls it by."""
    from cluster.images import ImageError

    image = None
    if images is not None:
        try:
            image = images.resolve(ref)
        except ImageError:
            image = None
    if image is not None:
        problem = image_problem(image, agentic, mount_points=False)
        if problem is not None:
            raise ImageRefused(f"sandbox.image {ref!r} ({image.digest[:19]}): {problem}")
    return image, pinned_reference(ref, image)


def pinned_reference(ref: str, image: Any = None) -> str:
    """`NAME@sha256:DIGEST` for a node to pull: `ref` itself when it is pinned, else its name
    with the manifest digest the store recorded for `image`. Raises `ImageRefused`."""
    try:
        parsed = parse_image_ref(ref)
    except ValueError as exc:
        raise ImageRefused(f"sandbox.image: {exc}") from None
    digest = parsed.digest or (image.manifest_digest if image is not None else None)
    if parsed.name is None or digest is None:
        known = "" if image is None else f" (the image store has it as {image.digest[:19]}, with no manifest digest)"
        raise ImageRefused(f"sandbox.image {ref!r}: the kubernetes runtime pulls images from a registry by digest"
                           f"{known}; write it as NAME@sha256:DIGEST, the digest of its manifest in the registry")
    return f"{parsed.name}@{digest}"


def image_problem(image: Any, agentic: bool, mount_points: bool = True) -> str | None:
    """Why the harness cannot run in `image` here, or None. `mount_points`: whether the
    image's root must have the folders a local sandbox mounts onto (a pod's runtime makes them)."""
    host = ARCHITECTURES.get(platform.machine(), platform.machine())
    if image.config.os and image.config.os != "linux":
        return f"it is an image for {image.config.os!r}; sandboxes run Linux images"
    if image.config.architecture and image.config.architecture != host:
        return f"it is built for {image.config.architecture}; this host runs {host}"
    for point in ("proc", "dev", "tmp", "workspace", "opt/proctor") if mount_points else ():
        if not (image.rootfs / point).is_dir() or (image.rootfs / point).is_symlink():
            return f"its root has no /{point} folder to mount onto (import it again with this Proctor)"
    if agentic and not exists_in(image.rootfs, "/bin/sh"):
        return "it has no /bin/sh, which the agent's bash tool runs commands with"
    return None


def exists_in(root: Path, path: str) -> bool:
    """Whether `path` names a file inside the image root `root`, its symlinks resolved as
    they would be inside (an absolute link starts again at `root`), never leaving it."""
    parts = list(PurePosixPath(path).parts[1:])
    current: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            current = current[:-1]
            continue
        candidate = root.joinpath(*current, part)
        try:
            target = os.readlink(candidate)
        except FileNotFoundError:
            return False
        except OSError:  # not a link
            current.append(part)
            continue
        links += 1
        if links > MAX_LINKS:
            return False
        if target.startswith("/"):
            current = []
        parts = list(PurePosixPath(target).parts[1 if target.startswith("/") else 0:]) + parts
    return root.joinpath(*current).exists() and not root.joinpath(*current).is_symlink()
