"""A tool-using Inspect task: the model squares a number with the bash tool, in a sandbox.

    proctor submit examples/inspect/bash_task.py@square --model mockllm/model -T samples=50 --wait

With `mockllm/model` the model is scripted, per sample: a bash call (`echo $((n * n))`)
then the answer; every scripted output carries its usage (without it Inspect would count
tokens with a tokenizer it downloads). With any other model (`openai/...`,
`anthropic/...`, through Proctor's gateway) the model itself drives the same loop.
The bash tool runs in the task's sandbox: under Proctor, a Proctor (gVisor) sandbox.
"""

from __future__ import annotations

from inspect_ai import Task, task
from inspect_ai.dataset import MemoryDataset, Sample
from inspect_ai.model import ModelOutput, ModelUsage, execute_tools, get_model
from inspect_ai.scorer import includes
from inspect_ai.solver import Generate, TaskState, solver, use_tools
from inspect_ai.tool import bash

MAX_TURNS = 6


def _scripted(n: int) -> list[ModelOutput]:
    call = ModelOutput.for_tool_call("mockllm/model", "bash", {"command": f"echo $(({n} * {n}))"})
    answer = ModelOutput.from_content("mockllm/model", f"The square of {n} is {n * n}.")
    for output in (call, answer):
        output.usage = ModelUsage(input_tokens=40, output_tokens=12, total_tokens=52)
    return [call, answer]


@solver
def squarer():
    async def solve(state: TaskState, generate: Generate) -> TaskState:
        model = get_model()
        if model.api.__class__.__name__ == "MockLLM":  # the offline script, one per sample
            model = get_model("mockllm/model", custom_outputs=_scripted(state.metadata["n"]), memoize=False)
        for _ in range(MAX_TURNS):
            output = await model.generate(state.messages, tools=state.tools)
            state.output = output
            state.messages.append(output.message)
            if not output.message.tool_calls:
                break
            messages, _ = await execute_tools(state.messages, state.tools)
            state.messages.extend(messages)
        return state

    return solve


@task
def square(samples: int = 50) -> Task:
    dataset = MemoryDataset([Sample(id=f"n{n}", input=f"What is {n} squared? Use bash.", target=str(n * n),
                                    metadata={"n": n}) for n in range(1, samples + 1)])
    return Task(dataset=dataset, solver=[use_tools(bash(timeout=30)), squarer()], scorer=includes(),
                sandbox="docker")
