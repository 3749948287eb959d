"""Inspect AI's conformance suite for sandbox providers (`inspect_ai.util._sandbox.
self_check`), run against the `proctor` provider on the kubernetes runtime, through the
API-server double (tests/kubeapi): one pod whose harness serves every check's requests
over the attach stream. Every check runs; the ones that cannot pass there are marked,
with the reason, inside the fixture (as the suite asks). None of the suite's checks needs
a network (the double has no pod network and no DNS; a multi-service sample's names are
checked in test_inspect_provider_kube.py, against a real cluster only).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from eval_actors.inspect_sandbox.provider import ProctorSandboxEnvironment
from eval_actors.inspect_sandbox.sample import ProviderHome
from inspect_ai.util._sandbox.self_check import *  # noqa: F403 - the suite's checks are collected here
from kubeapi import KubeApiDouble
from kubeapi.containers import HOST_USERLAND
from proctor.compose import ProctorConfig
from proctor.settings import Settings

pytestmark = [pytest.mark.anyio, pytest.mark.sandbox]

KNOWN = {"test_exec_as_user": "a pod runs its harness as a non-root user with every capability dropped and a "
                               "read-only root (podspec.py), so adduser cannot add a user and no command can "
                               "change user"}


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def double() -> Iterator[KubeApiDouble]:
    with KubeApiDouble() as d:
        d.kubelet.images[Settings().kube_image] = HOST_USERLAND
        yield d


@pytest.fixture(scope="module")
async def provider_env(double: KubeApiDouble, sandbox_root: Path, anyio_backend: str) -> AsyncIterator[Any]:
    """One sample's pod, shared by the checks (as Inspect's own runner does)."""
    config = ProctorConfig(runtime="kubernetes", home=str(sandbox_root / "inspect-selfcheck-kube"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PROCTOR_KUBECONFIG", str(double.kubeconfig))
        mp.setenv("PROCTOR_KUBE_INSTANCE", f"selfcheck-{os.urandom(3).hex()}")
        await ProctorSandboxEnvironment.task_init("selfcheck", config)
        envs = await ProctorSandboxEnvironment.sample_init("selfcheck", config, {})
        try:
            yield envs["default"]
        finally:
            await ProctorSandboxEnvironment.sample_cleanup("selfcheck", config, envs, False)
            await ProctorSandboxEnvironment.task_cleanup("selfcheck", config, True)
            ProviderHome.release(config)
    assert double.objects("pods") == [] and double.processes() == []


@pytest.fixture
def sandbox_env(request: pytest.FixtureRequest, provider_env: Any) -> Any:
    reason = KNOWN.get(request.node.originalname)
    if reason is not None:
        request.node.add_marker(pytest.mark.xfail(reason=f"kubernetes: {reason}", strict=True))
    return provider_env
