"""A task file that raises when it is loaded."""

from inspect_ai import Task, task

raise RuntimeError("this task file is broken on purpose")


@task
def broken() -> Task:
    return Task()
