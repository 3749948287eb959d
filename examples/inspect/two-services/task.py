"""A two-service Inspect task (a target service and the agent's machine) in Proctor:

    inspect eval examples/inspect/two-services/task.py --model mockllm/model

`compose.yaml` beside it gives the services; the scripted model fetches the target's
flag by the service's name over the sample's private network.
"""

from pathlib import Path

from inspect_ai import Task, task
from inspect_ai.dataset import Sample
from inspect_ai.model import ModelOutput, ModelUsage, get_model
from inspect_ai.scorer import includes
from inspect_ai.solver import generate, use_tools
from inspect_ai.tool import bash

MODEL = "mockllm/model"
FETCH = ("for i in $(seq 30); do python3 -c \"import socket; print(socket.create_connection(('target', 8080), "
         "timeout=3).recv(64).decode())\" 2>/dev/null && break; sleep 0.5; done")


def scripted() -> list[ModelOutput]:
    outputs = [ModelOutput.for_tool_call(MODEL, "bash", {"command": FETCH}),
               ModelOutput.from_content(MODEL, "The target said FLAG{proctor-private-network}.")]
    for output in outputs:
        output.usage = ModelUsage(input_tokens=20, output_tokens=10, total_tokens=30)
    return outputs


@task
def two_services() -> Task:
    return Task(
        dataset=[Sample(input="Fetch the flag from the service called target, port 8080.",
                        target="FLAG{proctor-private-network}")],
        solver=[use_tools([bash(timeout=60)]), generate()],
        scorer=includes(),
        model=get_model(MODEL, custom_outputs=scripted()),
        sandbox=("proctor", str(Path(__file__).parent / "compose.yaml")),
    )
