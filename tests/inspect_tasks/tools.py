"""Test tasks with a bash tool, scripted with mockllm: each sample runs `command` (its
`{n}` replaced by the sample's number) in the task's sandbox, then answers."""

from inspect_ai import Task, task
from inspect_ai.dataset import MemoryDataset, Sample
from inspect_ai.model import ModelOutput, ModelUsage, execute_tools, get_model
from inspect_ai.scorer import includes
from inspect_ai.solver import Generate, TaskState, solver, use_tools
from inspect_ai.tool import bash


@solver
def scripted(command: str):
    async def solve(state: TaskState, generate: Generate) -> TaskState:
        call = ModelOutput.for_tool_call("mockllm/model", "bash", {"command": command.format(n=state.metadata["n"])})
        call.usage = ModelUsage(input_tokens=10, output_tokens=5, total_tokens=15)
        model = get_model("mockllm/model", custom_outputs=[call], memoize=False)
        output = await model.generate(state.messages, tools=state.tools)
        state.messages.append(output.message)
        state.messages.extend((await execute_tools(state.messages, state.tools)).messages)
        # the answer is what the tool printed (as a script would read it back)
        state.output = ModelOutput.from_content("mockllm/model", state.messages[-1].text)
        state.messages.append(state.output.message)
        return state

    return solve


@task
def shell(samples: int = 3, command: str = "echo $(({n} * {n})); id -u") -> Task:
    return Task(dataset=MemoryDataset([Sample(id=f"n{n}", input="run it", target=str(n * n), metadata={"n": n})
                                       for n in range(1, samples + 1)]),
                solver=[use_tools(bash(timeout=30)), scripted(command)], scorer=includes(), sandbox="docker")


@task
def composed_shell(samples: int = 2, command: str = "echo $(({n} * {n})) $GREETING") -> Task:
    """The same, in the services of a compose file beside the task."""
    return Task(dataset=MemoryDataset([Sample(id=f"n{n}", input="run it", target=str(n * n), metadata={"n": n})
                                       for n in range(1, samples + 1)]),
                solver=[use_tools(bash(timeout=30)), scripted(command)], scorer=includes(),
                sandbox=("docker", "compose.yaml"))
