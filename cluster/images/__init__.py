"""Proctor's image store: task images, content-addressed, unpacked once, shared read-only.

    from cluster.images import ImageStore
    store = ImageStore.from_settings(settings)       # <PROCTOR_HOME>/images
    image = store.import_archive("task.tar")         # OCI layout or `docker save`
    image = store.build("recipe.yaml")               # Debian packages via mmdebstrap
    with store.lease(image.digest):                  # gc and rm leave a leased image alone
        ... image.rootfs, image.config ...

Archives and what recipes produce are untrusted: see `unpack.py` for what is refused.
"""

from .image import Image, ImageConfig, ImageError, ImageInUse, ImageLimits
from .specs import check_spec_images
from .store import ImageStore, Removal

__all__ = ["Image", "ImageConfig", "ImageError", "ImageInUse", "ImageLimits", "ImageStore", "Removal",
           "check_spec_images"]
