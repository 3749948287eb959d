"""An Inspect task with bash and python tools, run in Proctor's sandboxes:

    inspect eval examples/inspect/tools_task.py --sandbox proctor --model mockllm/model

The model is Inspect's `mockllm/model`, scripted (each answer carries its usage, so
nothing needs a network): it computes with bash, reads the result back with python, and
answers. Every command runs in a gVisor sandbox under Proctor's safety policy.
"""

from inspect_ai import Task, task
from inspect_ai.dataset import Sample
from inspect_ai.model import ModelOutput, ModelUsage, get_model
from inspect_ai.scorer import includes
from inspect_ai.solver import generate, use_tools
from inspect_ai.tool import bash, python

MODEL = "mockllm/model"


def scripted() -> list[ModelOutput]:
    outputs = [
        ModelOutput.for_tool_call(MODEL, "bash", {"command": "echo $((6 * 7)) > answer.txt && cat answer.txt"}),
        ModelOutput.for_tool_call(MODEL, "python", {"code": "print('python read', open('answer.txt').read().strip())"}),
        ModelOutput.from_content(MODEL, "The answer is 42."),
    ]
    for output in outputs:
        output.usage = ModelUsage(input_tokens=20, output_tokens=10, total_tokens=30)
    return outputs


@task
def tools_in_proctor() -> Task:
    return Task(
        dataset=[Sample(input="What is 6 times 7? Work it out with your tools.", target="42")],
        solver=[use_tools([bash(timeout=60), python(timeout=60)]), generate()],
        scorer=includes(),
        model=get_model(MODEL, custom_outputs=scripted()),
        sandbox="proctor",
    )
