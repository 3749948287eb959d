"""Scripted stand-ins for a model: plain Python functions used in examples and tests in place
of a model (not to be confused with the safety policy, `proctor/policy.py`). They are scripts,
not models; they follow instructions written into each sample's metadata and measure nothing
about any model.

Each is called by the `python` adapter as
`fn(messages, sample={id, input, choices, metadata}, workdir=str, **params)` and returns
the final answer (`str`) or `{"content": str, "tool_calls": [{"id": str, "command": str}]}`.
"""
