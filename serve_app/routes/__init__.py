"""The API's routes, one module per resource, each an `APIRouter` that `api.build_app` mounts.

Their shared dependencies (the caller, the store, the control plane's actors) are declared
once in `serve_app/deps.py`; their answer models are in `serve_app/models.py`.
"""

from __future__ import annotations

from fastapi import APIRouter

from . import evaluations, platform, results, safety, streams, tokens

ROUTERS: tuple[APIRouter, ...] = (evaluations.router, results.router, safety.router, tokens.router,
                                  platform.router, streams.router)
