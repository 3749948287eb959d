"""Image references: how a spec, the CLI and the image store name an image.

Four forms: `name` (= `name:latest`), `name:tag`, `sha256:<64 hex>` (the image's digest)
and `name@sha256:<64 hex>` (a name pinned to a digest; `name:tag@sha256:…` too). Names
follow Docker's grammar: lower-case path components separated by `/`, optionally after a
registry host (`ghcr.io/org/task`, `localhost:5000/task`). Docker Hub's implicit prefixes
are dropped (`docker.io/library/debian` is `debian`), as `docker images` shows them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_DOMAIN = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
                     r"(?::[0-9]{1,5})?$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
FORMS = "name, name:tag, sha256:<64 hex digits> or name@sha256:<64 hex digits>"


@dataclass(frozen=True)
class ImageRef:
    """A parsed reference. `name` is None for a bare digest; `tag` is None when a digest
    pins the name without a tag."""

    name: str | None
    tag: str | None
    digest: str | None

    @property
    def named(self) -> str | None:
        """`name:tag` (the form the store keeps names in), or None for a bare digest."""
        return f"{self.name}:{self.tag or 'latest'}" if self.name else None

    @property
    def pinned(self) -> bool:
        """A name pinned to a digest (`name@sha256:…`): what a registry can serve exactly."""
        return self.name is not None and self.digest is not None

    def __str__(self) -> str:
        if self.name is None:
            return str(self.digest)
        text = self.name + (f":{self.tag}" if self.tag else "")
        return text + (f"@{self.digest}" if self.digest else "")


def parse_image_ref(text: str) -> ImageRef:
    """Parse and normalise a reference. Raises `ValueError` saying what is wrong and which
    forms are accepted."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"an image reference is needed; write {FORMS}")
    ref = text.strip()
    if len(ref) > 512:
        raise ValueError(f"image reference {ref[:40]!r}… is longer than 512 characters")
    if ref.startswith("sha256:"):
        if not DIGEST_RE.match(ref):
            raise ValueError(f"{ref!r} is not a digest: write sha256: and 64 lower-case hex digits")
        return ImageRef(None, None, ref)
    name, _, digest = ref.partition("@")
    if digest and not DIGEST_RE.match(digest):
        raise ValueError(f"{ref!r}: {digest!r} after '@' is not a digest; write sha256: and 64 lower-case hex digits")
    tag = None
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = name[: len(name) - len(last)] + last.split(":", 1)[0], last.split(":", 1)[1]
        if not _TAG.match(tag):
            raise ValueError(f"{ref!r}: tag {tag!r} must be letters, digits, '_', '.' or '-' (at most 128, "
                             "not starting with '.' or '-')")
    return ImageRef(_check_name(name, ref), tag, digest or None)


def _check_name(name: str, ref: str) -> str:
    parts = name.split("/")
    if len(parts) > 1 and (parts[0] == "localhost" or "." in parts[0] or ":" in parts[0]):
        if not _DOMAIN.match(parts[0]):
            raise ValueError(f"{ref!r}: {parts[0]!r} is not a registry host")
        path = parts[1:]
    else:
        path = parts
    for part in path:
        if not _COMPONENT.match(part):
            raise ValueError(f"{ref!r} is not an image reference: name part {part!r} must be lower-case letters "
                             f"and digits, separated by '.', '_' or '-'; write {FORMS}")
    if parts[0] in ("docker.io", "index.docker.io") and len(parts) > 1:
        parts = parts[1:]
        if parts[0] == "library" and len(parts) == 2:
            parts = parts[1:]
    return "/".join(parts)
