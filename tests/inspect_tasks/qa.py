"""Test tasks (no sandbox): questions answered by the evaluation's model, scored by `includes`.

`answers` the model is expected to give is the target of every sample; mockllm's default
answer is "Default output from mockllm/model".
"""

from inspect_ai import Task, task
from inspect_ai.dataset import MemoryDataset, Sample
from inspect_ai.scorer import includes
from inspect_ai.solver import generate


@task
def qa(samples: int = 6, target: str = "Default output") -> Task:
    return Task(dataset=MemoryDataset([Sample(id=f"q{i}", input=f"question {i}", target=target)
                                       for i in range(samples)]),
                solver=generate(), scorer=includes())


@task
def numbered(samples: int = 4) -> Task:
    """Samples without ids: Inspect numbers them 1..N."""
    return Task(dataset=MemoryDataset([Sample(input=f"question {i}", target="Default") for i in range(samples)]),
                solver=generate(), scorer=includes())


@task
def composed() -> Task:
    """A sandbox Proctor cannot honour: a compose file."""
    return Task(dataset=MemoryDataset([Sample(input="q", target="a")]), solver=generate(), scorer=includes(),
                sandbox=("docker", "compose.yaml"))


@task
def slow(samples: int = 4, seconds: float = 60.0) -> Task:
    """Samples that take `seconds` each (for cancel and stop)."""
    import asyncio

    from inspect_ai.solver import Generate, TaskState, solver

    @solver
    def wait():
        async def solve(state: TaskState, generate: Generate) -> TaskState:
            await asyncio.sleep(seconds)
            return await generate(state)

        return solve

    return Task(dataset=MemoryDataset([Sample(id=f"s{i}", input=f"question {i}", target="Default")
                                       for i in range(samples)]),
                solver=wait(), scorer=includes())


@task
def dockerfiles(samples: int = 2) -> Task:
    """Samples that each declare a Docker sandbox built from a Dockerfile (as inspect_evals' 3CB)."""
    from inspect_ai.util import SandboxEnvironmentSpec

    return Task(dataset=MemoryDataset([Sample(id=f"d{i}", input=f"question {i}", target="Default",
                                              sandbox=SandboxEnvironmentSpec("docker", "Dockerfile"))
                                       for i in range(samples)]),
                solver=generate(), scorer=includes())
