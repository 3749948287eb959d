"""Recipe builds: mmdebstrap makes a Debian root filesystem as a tar, and the store imports
that tar like any untrusted archive (setuid bits stripped).

mmdebstrap runs as root (`--mode=root`, `--variant=minbase`) from the host's own apt
sources for the recipe's suite (or `PROCTOR_IMAGE_APT_MIRROR`). Packages already in the
host's apt cache or the store's (`<store>/apt-cache`, filled by earlier builds) are
hard-linked in rather than downloaded. The recipe's steps are mmdebstrap customize hooks,
each run inside the new root with `chroot`; each announces itself (`proctor-step: …`) so
that a failure names its step and the tail of its output. Its work folder lives in the
store's private tmp/ and is removed whatever happens (unmounting anything a killed
mmdebstrap left mounted in it first).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import subprocess
import threading
from collections import deque
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from .archive import Layer, host_architecture
from .catalog import remove_tree
from .image import Image, ImageConfig, ImageError
from .recipe import Recipe, load_recipe, recipe_key
from .store import new_record

if TYPE_CHECKING:
    from .store import ImageStore, Progress

HOST_APT_CACHE = Path("/var/cache/apt/archives")
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STEP_MARK = "proctor-step: "
TAIL_LINES = 25


def build_image(store: "ImageStore", path: Path, on_progress: "Progress | None",
                on_line: Callable[[str], None] | None) -> Image:
    recipe = load_recipe(path)
    sources = apt_sources(recipe.base, store.apt_mirror)
    key = recipe_key(recipe, path.parent, sources)
    cached = store.catalog.build_digest(key)
    if cached and store.catalog.record(cached) is not None:
        return store.add_names(cached, (recipe.name,))
    work, staging = store.catalog.staging(), store.catalog.staging()
    try:
        tar = work / "rootfs.tar"
        _mmdebstrap(recipe, path, sources, work, tar, store.catalog.apt_cache, store.build_timeout_s, on_line)
        label = f"{recipe.name} (recipe {path})"
        built = Layer("the built root filesystem", tar.stat().st_size, None, None, lambda: tar.open("rb"))
        if on_line:
            on_line(f"{STEP_MARK}import")
        diff_ids, size, stripped = store.unpack([built], staging / "rootfs", label, True, on_progress)
        remove_tree(work)
        config = _config(recipe, diff_ids, path, key)
        digest = "sha256:" + hashlib.sha256(config).hexdigest()
        record = new_record(digest, ImageConfig.from_oci(json.loads(config), label), size, None,
                            f"recipe {path.resolve()} (sha256:{key})", diff_ids, None, stripped)
        image = store.commit(staging, record, config, (recipe.name,))
        store.catalog.write_build(key, digest, str(path.resolve()))
        return image
    except BaseException:
        remove_tree(staging)
        raise
    finally:
        if work.exists():
            remove_tree(work)


def apt_sources(suite: str, mirror: str | None) -> list[str]:
    """Sources lines for `suite`: the mirror given, else the host's entries for that suite
    (and its -updates and -security), else the host's Debian mirror with that suite."""
    if mirror:
        return [f"deb {mirror} {suite} main"]
    entries = _host_entries()
    lines = [f"deb {uri} {s} {' '.join(comps)}" for uri, suites, comps in entries for s in suites
             if s == suite or s in (f"{suite}-updates", f"{suite}-security")]
    if lines:
        return lines
    debian = next((uri for uri, suites, _ in entries if uri.rstrip("/").endswith("/debian")), DEFAULT_MIRROR)
    return [f"deb {debian} {suite} main"]


def _host_entries(etc: Path = Path("/etc/apt")) -> list[tuple[str, list[str], list[str]]]:
    """(uri, suites, components) of the host's `deb` sources, one-line and deb822 forms."""
    entries = []
    for path in [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list"))]:
        for line in path.read_text().splitlines() if path.is_file() else ():
            words = line.split("#", 1)[0].split()
            if words[:1] == ["deb"]:
                if len(words) > 1 and words[1].startswith("["):
                    while words and not words[1].endswith("]"):
                        words.pop(1)
                    words.pop(1)
                if len(words) >= 3:
                    entries.append((words[1], [words[2]], words[3:] or ["main"]))
    for path in sorted((etc / "sources.list.d").glob("*.sources")):
        for block in path.read_text().split("\n\n"):
            fields: dict[str, str] = {}
            for line in block.splitlines():
                if ":" in line and not line.startswith(("#", " ")):
                    name, _, value = line.partition(":")
                    fields[name.strip().lower()] = value.strip()
            if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes") != "no":
                for uri in fields.get("uris", "").split():
                    entries.append((uri, fields.get("suites", "").split(), fields.get("components", "main").split()))
    return entries


def _mmdebstrap(recipe: Recipe, path: Path, sources: list[str], work: Path, out: Path, cache: Path,
                timeout_s: float, on_line: Callable[[str], None] | None) -> None:
    argv = ["mmdebstrap", "--variant=minbase", "--mode=root", "--format=tar", "--skip=output/dev",
            "--skip=essential/unlink", "--setup-hook=" + _link_cache(cache)]
    if recipe.packages:
        argv.append("--include=" + ",".join(recipe.packages))
    for hook in _hooks(recipe, path, work, cache):
        argv.append("--customize-hook=" + hook)
    argv += [recipe.base, str(out), *sources]
    # no host secrets reach the build: a clean environment, with the proxy settings apt may need
    env = {k: v for k, v in os.environ.items() if k.lower() in ("http_proxy", "https_proxy", "no_proxy")}
    env.update(PATH=DEFAULT_PATH, LANG="C.UTF-8", TMPDIR=str(work))
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True, text=True, errors="replace")
    except FileNotFoundError:
        raise ImageError("building images needs mmdebstrap, which is not installed: run `bash scripts/setup.sh` "
                         "(or apt-get install mmdebstrap)") from None
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    step = ["packages (mmdebstrap: downloading and installing the Debian packages)"]

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.startswith(STEP_MARK):
                step[0] = line.removeprefix(STEP_MARK)
            else:
                tail.append(line)
            if on_line:
                on_line(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _stop(proc)
        code = None
    except BaseException:
        _stop(proc)
        raise
    reader.join(timeout=10)
    proc.stdout.close()  # type: ignore[union-attr]
    if code != 0:
        why = f"took longer than {timeout_s:.0f} s (PROCTOR_IMAGE_BUILD_TIMEOUT_S)" if code is None else "failed"
        output = "\n".join(f"    {line}" for line in tail)
        raise ImageError(f"recipe {path}: the step {step[0]} {why}; nothing was stored. Its output ended with:\n"
                         f"{output}")


def _stop(proc: subprocess.Popen[str]) -> None:
    """SIGTERM (mmdebstrap unmounts and cleans up), then SIGKILL."""
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=grace)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _link_cache(cache: Path) -> str:
    archives = '"$1"/var/cache/apt/archives/'
    links = " ".join(f"ls {shlex.quote(str(d))}/*.deb >/dev/null 2>&1 && cp -ln {shlex.quote(str(d))}/*.deb "
                     f"{archives} 2>/dev/null;" for d in (HOST_APT_CACHE, cache))
    return f"mkdir -p {archives} && {{ {links} true; }}"


def _hooks(recipe: Recipe, path: Path, work: Path, cache: Path) -> list[str]:
    """The customize hooks, in order: keep new packages, files, pip, run, owners, workdir, user."""
    q = shlex.quote
    env = {"PATH": DEFAULT_PATH, "HOME": "/root", "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive",
           **recipe.env}
    in_root = 'chroot "$1" env -i ' + " ".join(q(f"{k}={v}") for k, v in env.items()) + " "

    def step(label: str, command: str) -> str:
        return f"echo {q(STEP_MARK + label)}; {command}"

    host = q(str(HOST_APT_CACHE))
    hooks = [f'for f in "$1"/var/cache/apt/archives/*.deb; do [ -e {host}/"${{f##*/}}" ] || '
             f'ln -f "$f" {q(str(cache))}/ 2>/dev/null; rm -f "$f"; done; true']  # keep what the host lacks
    for i, (target, spec) in enumerate(recipe.files.items()):
        source = path.parent / spec.source if spec.source is not None else work / f"file-{i}"
        if spec.content is not None:
            source.write_text(spec.content)
        parent = target.rsplit("/", 1)[0] or "/"
        hooks.append(step(f"files: {target}", f"{in_root}mkdir -p {q(parent)} && "
                          f"{in_root}/bin/sh -c 'cat > \"$0\"' {q(target)} < {q(str(source))} && "
                          f"{in_root}chmod {spec.mode} {q(target)}"))
    if recipe.pip:
        # pip trusts the host's CA certificates (a TLS-inspecting proxy's among them) for this step only
        ca, cert = "/tmp/proctor-host-ca.crt", ""
        pip = (f"{in_root}python3 -m pip install --no-cache-dir --break-system-packages --root-user-action=ignore "
               f"{' '.join(q(r) for r in recipe.pip)}")
        if HOST_CA_BUNDLE.is_file():
            cert = f"{in_root}/bin/sh -c 'cat > {ca}' < {q(str(HOST_CA_BUNDLE))} && "
            pip = f"{pip} --cert {ca}; status=$?; {in_root}rm -f {ca}; exit $status"
        hooks.append(step("pip", cert + pip))
    for i, command in enumerate(recipe.run, 1):
        hooks.append(step(f"run[{i}]: {command}", f"{in_root}/bin/sh -ec {q(command)}"))
    for target, spec in recipe.files.items():
        if spec.owner != "root":
            hooks.append(step(f"files: {target} (owner {spec.owner})", f"{in_root}chown {q(spec.owner)} {q(target)}"))
    if recipe.workdir:
        hooks.append(step(f"workdir: {recipe.workdir}", f"{in_root}mkdir -p {q(recipe.workdir)}"))
    user = (recipe.user or "").split(":")[0]
    if user and not user.isdigit():
        hooks.append(step(f"user: {recipe.user}", f"{in_root}id -u {q(user)} >/dev/null"))
    hooks.append(step("finishing (mmdebstrap: clean-up and the root filesystem's tar)", "true"))
    return hooks


def _config(recipe: Recipe, diff_ids: list[str], path: Path, key: str) -> bytes:
    """The OCI image config of a built image (its sha256 is the image's digest)."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    env = {"PATH": DEFAULT_PATH, **recipe.env}
    run: dict[str, object] = {"Env": [f"{k}={v}" for k, v in env.items()]}
    if recipe.user:
        run["User"] = recipe.user
    if recipe.workdir:
        run["WorkingDir"] = recipe.workdir
    doc = {"architecture": host_architecture(), "os": "linux", "created": now, "config": run,
           "rootfs": {"type": "layers", "diff_ids": diff_ids},
           "history": [{"created": now, "created_by": f"proctor image build {path.name} (recipe sha256:{key})"}]}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
