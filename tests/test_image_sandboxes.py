"""Shards in a task's own image, in real sandboxes: the harness injected into an image that
has no Python and no C library (busybox alone), the agent as the image's user, and an
image the harness cannot run in refused at launch with the reason."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from cluster.images import ImageError, ImageStore
from cluster.runtimes import SandboxRuntime
from eval_actors.launch import exists_in, image_problem
from eval_actors.local_run import run_evaluation
from imagearchives import ImageDef, busybox_image, docker_archive, oci_archive
from proctor.settings import Settings
from proctor.spec import parse_spec

pytestmark = pytest.mark.sandbox
@pytest.fixture
def settings(tmp_path: Path, sandbox_root: Path) -> Settings:
    return Settings(home=sandbox_root, results_uri=(tmp_path / "results").as_uri())


def imported(settings: Settings, tmp_path: Path, image: ImageDef, docker: bool = False) -> Any:
    archive = docker_archive(tmp_path / "image.tar", image) if docker else oci_archive(tmp_path / "image.tar", image)
    return ImageStore.from_settings(settings).import_archive(archive, name="busybox-task:1")


def run(settings: Settings, runtime: SandboxRuntime, commands: list[str], **sandbox: Any) -> Any:
    spec = parse_spec({
        "name": "in-image", "agentic": True,
        "model": {"adapter": "python", "callable": "proctor.scripted.file_agent:solve"},
        "dataset": {"samples": [{"id": "a", "input": "x", "target": "done", "metadata": {"commands": commands}}]},
        "scorers": [{"type": "command", "name": "ok", "command": 'test "$(cat out.txt)" != ""'}],
        "sandbox": {"timeout_s": 60, "memory": "512Mi", "image": "busybox-task:1", "artifacts": ["out.txt"], **sandbox},
    })
    return asyncio.run(run_evaluation(spec, settings, runtime=runtime))


def test_a_shard_runs_in_an_image_without_python_or_libc(runtime: SandboxRuntime, settings: Settings,
                                                        tmp_path: Path) -> None:
    imported(settings, tmp_path, busybox_image())
    probe = ("(id -un; echo $TASK_MODE; cat /srv/secret.txt 2>/dev/null || echo refused; ls /opt/proctor >/dev/null "
             "2>&1 && echo sees-harness; ls /usr 2>/dev/null || echo no-usr) > out.txt")
    result = run(settings, runtime, [probe])
    assert result.status == "succeeded", [o.error for o in result.outcomes]
    root = Path(result.results_uri.removeprefix("file://"))
    (out,) = (root / "_artifacts").rglob("out.txt")
    lines = out.read_text().split()
    assert lines[:3] == ["player", "image", "refused"]  # the image's user and environment; svc's file is not its
    assert lines[-1] == "no-usr"  # the image's own userland: no /usr of the host's
    df = pd.read_parquet(root)
    assert df["scores"].map(dict).tolist() == [{"ok": 1.0}]


def test_an_image_for_another_architecture_is_refused(settings: Settings, tmp_path: Path) -> None:
    """At import (the store reads the platform), and again at launch (an image imported
    elsewhere, or a store edited by hand)."""
    with pytest.raises(ImageError, match="linux/s390x"):
        imported(settings, tmp_path, busybox_image(architecture="s390x", compression=None), docker=True)
    image = imported(settings, tmp_path, busybox_image())
    assert image_problem(image, agentic=True) is None
    foreign = dataclasses.replace(image, config=dataclasses.replace(image.config, architecture="s390x"))
    assert "built for s390x" in (image_problem(foreign, agentic=True) or "")
    windows = dataclasses.replace(image, config=dataclasses.replace(image.config, os="windows"))
    assert "sandboxes run Linux images" in (image_problem(windows, agentic=False) or "")


def test_an_agentic_shard_needs_a_shell_in_its_image(runtime: SandboxRuntime, settings: Settings,
                                                    tmp_path: Path) -> None:
    imported(settings, tmp_path, busybox_image(shell=False))
    (outcome,) = run(settings, runtime, ["echo hi > out.txt"]).outcomes
    assert outcome.status == "failed" and "no /bin/sh" in outcome.error


def test_a_path_is_resolved_inside_the_image_never_on_the_host(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/sh").write_text("")
    (root / "bin").symlink_to("/usr/bin")  # absolute: inside the image, not the host's /usr/bin
    (root / "etc").mkdir()
    (root / "etc/escape").symlink_to("../../../../../../etc")
    assert exists_in(root, "/bin/sh")
    assert not exists_in(root, "/etc/escape/passwd")  # the host's /etc/passwd is not the image's
    (root / "loop").symlink_to("loop")
    assert not exists_in(root, "/loop/x")


@pytest.mark.slow
def test_the_ctf_example_builds_its_image_and_only_the_service_path_finds_the_flag(
        settings: Settings, tmp_path: Path) -> None:
    """examples/ctf-local as the main command runs it: its image built from the recipe
    (mmdebstrap), the service started by setup as its own user, the scripted agent as
    `player`, the scorer after the agent is gone."""
    from cluster.runtimes import GvisorRuntime
    from proctor.spec import load_spec

    example = Path(__file__).resolve().parent.parent / "examples" / "ctf-local"
    image = ImageStore.from_settings(settings).build(example / "image.yaml")
    assert image.config.user == "player"
    flag = image.rootfs / "home/ctf/flag.txt"
    assert (flag.stat().st_mode & 0o777, flag.stat().st_uid) == (0o400, 1000)  # ctf's alone
    runtime = GvisorRuntime(settings.sandbox_dir / "ctf")
    result = asyncio.run(run_evaluation(load_spec(example / "ctf.yaml"), settings, runtime=runtime))
    assert result.status == "succeeded", [o.error for o in result.outcomes]
    df = pd.read_parquet(result.results_uri.removeprefix("file://")).set_index("sample_id")
    assert df.loc["read-the-flag", "score"] == 1.0  # through the file service's bug
    assert df.loc["no-shortcut", "score"] == 0.0  # the agent's user cannot read the flag itself
