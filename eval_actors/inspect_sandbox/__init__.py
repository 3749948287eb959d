"""Proctor inside Inspect AI: the ``proctor`` sandbox provider.

Inspect's eval loop runs outside the sandbox; each sample's services are Proctor sandboxes
(gVisor or bubblewrap, on a private network of the sample's own when it has several), whose
harness serves `exec`, `read_file` and `write_file` over the runner protocol's service mode
(`proctor/requests.py`), under the evaluation's safety policy. It lives in `eval_actors`
because it launches sandboxes itself (runtimes, images, monitors), like a supervisor does;
only Inspect imports it, through its entry point (`_registry`). Task configs are parsed by
`proctor.compose`.
"""
