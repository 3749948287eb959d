"""Where specs enter the platform (`proctor run`, the API's submit): the image a spec names
must be in the store, or the spec is refused before anything runs or is stored."""

from __future__ import annotations

from proctor.imageref import parse_image_ref
from proctor.spec import EvaluationSpec, SpecError

from .image import Image, ImageError
from .store import ImageStore


def check_spec_images(spec: EvaluationSpec, store: ImageStore, default_runtime: str = "auto") -> Image | None:
    """The stored image `spec.sandbox.image` names (None when it names none, or when the
    kubernetes runtime will pull it by digest). `default_runtime` is what 'auto' means here
    (`Settings.runtime`). Raises `SpecError` on the field `sandbox.image`."""
    ref = spec.sandbox.image
    if ref is None:
        return None
    runtime = default_runtime if spec.sandbox.runtime == "auto" else spec.sandbox.runtime
    if runtime == "kubernetes":
        if parse_image_ref(ref).pinned:
            return None  # the cluster pulls it from its registry, by that digest
        raise SpecError([("sandbox.image", f"{ref!r}: the kubernetes runtime runs images from a registry by digest "
                          "only; write it as name@sha256:<digest> (e.g. from `skopeo inspect` or `docker "
                          "inspect --format '{{index .RepoDigests 0}}'`)")])
    try:
        return store.resolve(ref)
    except ImageError as exc:
        raise SpecError([("sandbox.image", str(exc))]) from None
