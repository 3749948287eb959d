"""A test task (no sandbox) whose answer says where its worker runs: the GPUs it sees
(`CUDA_VISIBLE_DEVICES`) and its parent process (the Ray actor that hosts it)."""

import asyncio
import os

from inspect_ai import Task, task
from inspect_ai.dataset import MemoryDataset, Sample
from inspect_ai.model import ModelOutput
from inspect_ai.scorer import includes
from inspect_ai.solver import Generate, TaskState, solver


@task
def where(samples: int = 2, seconds: float = 0.0) -> Task:
    @solver
    def report():
        async def solve(state: TaskState, generate: Generate) -> TaskState:
            await asyncio.sleep(seconds)
            parent = os.getppid()
            with open(f"/proc/{parent}/cmdline", "rb") as f:
                title = f.read().replace(b"\0", b" ").decode(errors="replace").split()[0]
            cuda = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
            state.output = ModelOutput.from_content("mockllm/model", f"cuda={cuda} ppid={parent} parent={title}")
            return state

        return solve

    return Task(dataset=MemoryDataset([Sample(id=f"g{i}", input=f"where {i}", target="cuda=")
                                       for i in range(samples)]),
                solver=report(), scorer=includes())
