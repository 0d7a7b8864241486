"""The Hugging Face hub as this machine sees it: where its cache is, what a revision name resolves to there, and the one
order in which a hub model's config.json is looked up (validate, plan, the doctor and `recipe run` all use it, so they
read the same config).

Order: the local HF cache at the pinned revision, then the copy bundled in runner/model_configs (checked against the
pinned revision when it was added), then - only where the caller allows it - one download of config.json.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")  # huggingface_hub's REGEX_COMMIT_HASH
BUNDLED_CONFIGS = Path(__file__).resolve().parent / "model_configs"


def hf_home() -> Path:
    """huggingface_hub's home folder ($HF_HOME, else $XDG_CACHE_HOME/huggingface, else ~/.cache/huggingface)."""
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(os.path.expanduser(os.path.expandvars(home)))


def hub_cache_root() -> Path:
    """huggingface_hub's cache folder, read from the environment now (its constants are fixed at import):
    $HF_HUB_CACHE (or the older $HUGGINGFACE_HUB_CACHE), else hf_home()/hub."""
    root = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    return Path(os.path.expanduser(os.path.expandvars(root))) if root else hf_home() / "hub"


def cached_ref(kind: str, repo: str, name: str) -> str | None:
    """The commit the local HF cache's refs/NAME records for a model or dataset repo (huggingface_hub's layout:
    `$HF_HUB_CACHE/{kind}s--ORG--NAME/refs/NAME`), or None."""
    refs = hub_cache_root() / f"{kind}s--{repo.replace('/', '--')}" / "refs"
    try:
        ref = (refs / name).resolve()
        if refs.resolve() not in ref.parents or not ref.is_file():  # `../..` must not read outside refs/
            return None
        commit = ref.read_text(encoding="utf-8").strip()
    except (OSError, ValueError, UnicodeDecodeError):  # a name the OS refuses (NUL byte, too long), unreadable
        return None
    return commit if COMMIT_SHA.match(commit) else None


def hub_cache_config(hub: str, revision: str | None) -> Path | None:
    """config.json of `hub` at `revision` in the local HF cache (a commit sha, or a branch/tag its refs/ resolves)."""
    commit = revision or "main"
    if not COMMIT_SHA.match(commit):
        commit = cached_ref("model", hub, commit) or commit
    candidate = hub_cache_root() / f"models--{hub.replace('/', '--')}" / "snapshots" / commit / "config.json"
    return candidate if candidate.is_file() else None


def fetch_config(hub: str, revision: str | None) -> Path | None:
    """config.json of `hub` at `revision`, downloaded into the HF cache; None when the hub cannot give it."""
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(hub, "config.json", revision=revision))
    except Exception:  # noqa: BLE001 - offline, gated, or missing: the train step's own loading will say which
        return None


def hub_config(hub: str, revision: str | None, fetch: bool = False) -> tuple[dict[str, Any] | None, str]:
    """The config.json of `hub` at `revision` as a dict (None when no copy can be had), and where it came from."""
    cached = hub_cache_config(hub, revision)
    if cached is not None:
        return json.loads(cached.read_text()), f"HF cache {cached}"
    bundled = BUNDLED_CONFIGS / f"{hub.replace('/', '--')}.json"
    if bundled.is_file():
        return json.loads(bundled.read_text()), f"bundled runner/model_configs/{bundled.name}"
    if fetch:  # one small file from the hub, into the HF cache
        fetched = fetch_config(hub, revision)
        if fetched is not None:
            return json.loads(fetched.read_text()), f"{hub}@{revision} (fetched)"
    return None, f"{hub}@{revision} (not in the HF cache, no bundled copy)"
