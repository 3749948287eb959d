"""The in-sandbox harness: `python -S -B -m proctor.harness [--workspace PATH]`.

It speaks the runner protocol (`proctor.protocol`) on stdin and stdout, runs one shard's
samples through a model adapter (`adapters`), lets the model use a shell tool in a
per-sample directory when the shard is agentic (`tools`), scores each answer
(`scorers`) and reports every sample as it completes (`runner`), its conversation
sent as it happens (`transcript`).

It imports only the standard library, pydantic, pyyaml and `proctor`; never Ray. This
module imports nothing, so that `__main__` can announce itself before anything heavy
loads.
"""
