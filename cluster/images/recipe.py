"""Image recipes: a small YAML file that says how to build a task image without Docker.

    name: ctf-task:1             # the image's name (:latest when no tag)
    base: bookworm               # a Debian suite
    packages: [file, python3-pip]
    pip: [requests==2.32.3]      # from PyPI with the image's own pip: needs python3-pip in packages
    files:
      /srv/check.sh: {source: check.sh, mode: "0755"}       # source: relative to the recipe
      /srv/flag: {content: "FLAG{…}\\n", mode: "0400", owner: ctf}
    run:                         # shell commands run as root in the image, in order
      - useradd --system ctf
    user: ctf                    # what the image runs as, its working folder, environment
    workdir: /srv
    env: {LANG: C.UTF-8}

Files are placed before `run:`; their owner is applied after it, so it may be a user that
`run:` creates. A recipe is trusted (a researcher wrote it); the image it produces is not,
and is imported like any archive. `recipe_key` is the build cache's key: the recipe, the
contents of its source files, and the mirror.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from proctor.imageref import parse_image_ref

from .image import ImageError

BUILDER_VERSION = 1
_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]+(?:=[A-Za-z0-9.+~:-]+)?$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_OWNER = re.compile(r"^[a-z_][a-z0-9_-]*[$]?(?::[a-z_][a-z0-9_-]*[$]?)?$|^[0-9]+(?::[0-9]+)?$")


class RecipeFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    content: str | None = Field(None, description="the file's text")
    source: str | None = Field(None, description="a file to copy, relative to the recipe")
    mode: str = Field("0644", description="octal, as a string: '0400'")
    owner: str = Field("root", description="user or user:group (names or numbers)")

    @model_validator(mode="after")
    def _one_source(self) -> "RecipeFile":
        if (self.content is None) == (self.source is None):
            raise ValueError("give exactly one of 'content' or 'source'")
        return self

    @field_validator("mode")
    @classmethod
    def _octal(cls, v: str) -> str:
        if not re.fullmatch(r"0?[0-7]{3}", v):
            raise ValueError(f"mode {v!r} must be octal digits in quotes, e.g. '0644' or '0400' (no setuid bits)")
        return v

    @field_validator("owner")
    @classmethod
    def _owner(cls, v: str) -> str:
        if not _OWNER.match(v):
            raise ValueError(f"owner {v!r} must be user or user:group (names or numbers)")
        return v


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: str = Field(description="the image's name, name[:tag]")
    base: str = Field(pattern=r"^[a-z][a-z0-9-]*$", description="a Debian suite, e.g. bookworm")
    packages: list[str] = Field(default_factory=list, description="Debian packages")
    pip: list[str] = Field(default_factory=list, description="Python packages, installed with the image's pip")
    files: dict[str, RecipeFile] = Field(default_factory=dict, description="absolute path in the image -> file")
    run: list[str] = Field(default_factory=list, description="shell commands, run as root in the image, in order")
    user: str | None = Field(None, description="user (or uid[:gid]) the image runs as")
    workdir: str | None = Field(None, description="working folder of the image (made if missing)")
    env: dict[str, str] = Field(default_factory=dict, description="environment of the image (and of `run:`)")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        ref = parse_image_ref(v)
        if ref.digest or not ref.named:
            raise ValueError(f"{v!r} is a digest; give a name such as ctf-task or ctf-task:1")
        return ref.named

    @field_validator("packages")
    @classmethod
    def _packages(cls, v: list[str]) -> list[str]:
        for name in v:
            if not _PACKAGE.match(name):
                raise ValueError(f"{name!r} is not a Debian package name (or name=version)")
        return v

    @field_validator("pip")
    @classmethod
    def _requirements(cls, v: list[str]) -> list[str]:
        for req in v:
            if not req.strip() or req.lstrip().startswith("-"):
                raise ValueError(f"{req!r} is not a requirement (options such as --index-url are not accepted)")
        return v

    @field_validator("files")
    @classmethod
    def _paths(cls, v: dict[str, RecipeFile]) -> dict[str, RecipeFile]:
        for path in v:
            _absolute(path, "files")
        return v

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, v: str | None) -> str | None:
        return _absolute(v, "workdir") if v is not None else v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if not _ENV_KEY.match(key):
                raise ValueError(f"{key!r} is not an environment variable name")
        return v

    @model_validator(mode="after")
    def _pip_needs_pip(self) -> "Recipe":
        if self.pip and not any(p.split("=")[0] == "python3-pip" for p in self.packages):
            raise ValueError("pip: installing Python packages needs the image's own pip: add python3-pip to packages")
        return self


def _absolute(path: str, field: str) -> str:
    parts = path.split("/")
    if not path.startswith("/") or ".." in parts or path == "/" or "\x00" in path:
        raise ValueError(f"{field}: {path!r} must be an absolute path in the image, without '..'")
    return path


def load_recipe(path: Path) -> Recipe:
    """Read and check a recipe. Raises `ImageError` naming the file and every bad field."""
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ImageError(f"recipe {path}: cannot be read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ImageError(f"recipe {path}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ImageError(f"recipe {path}: must be a mapping of fields (name, base, packages, …)")
    try:
        recipe = Recipe.model_validate(doc)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "(recipe)"
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {field}: {'unknown field' if err['type'] == 'extra_forbidden' else msg}")
        raise ImageError(f"recipe {path} is invalid:\n" + "\n".join(lines)) from None
    for target, spec in recipe.files.items():
        if spec.source is not None and not (path.parent / spec.source).is_file():
            raise ImageError(f"recipe {path}: files.{target}: source {spec.source!r} is not a file next to the recipe")
    return recipe


def recipe_key(recipe: Recipe, recipe_dir: Path, sources: list[str]) -> str:
    """The build cache's key: what the build depends on, hashed."""
    doc: dict[str, Any] = {"builder": BUILDER_VERSION, "recipe": recipe.model_dump(), "sources": sources,
                           "files": {}}
    for target, spec in recipe.files.items():
        if spec.source is not None:
            doc["files"][target] = hashlib.sha256((recipe_dir / spec.source).read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
