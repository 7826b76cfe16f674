"""The on-disk cache of prepared tensors.

In deployment every Flower message runs in a fresh process, and in simulation
one Ray worker serves many nodes, so prepared data cannot live in module-level
variables: it lives in files under ``$BOUQUET_CACHE_DIR`` (default
``~/.cache/bouquet``), named by a hash of everything that shapes the data.

Writes are atomic (a private temporary file, then ``os.replace``): two
processes that build the same entry at once both write complete files, and a
reader sees either no file or a whole one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Bump when the layout or meaning of cached tensors changes.
FORMAT_VERSION = 1


def cache_dir() -> Path:
    """The cache root, read from the environment on every call."""
    configured = os.environ.get("BOUQUET_CACHE_DIR", "")
    return Path(configured) if configured else Path.home() / ".cache" / "bouquet"


def path_fingerprint(path: str) -> list[Any]:
    """Size and modification time of a file, or of every file under a folder.

    Part of the cache key of local data, so editing the files invalidates it.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data-path {path!r} does not exist")
    files = (
        [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    )
    return [
        [str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns]
        for f in files
    ]


def cache_key(fields: Mapping[str, Any]) -> str:
    """A short stable hash of ``fields`` (JSON-serialisable values)."""
    payload = json.dumps(
        {"format": FORMAT_VERSION, **fields}, sort_keys=True, default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` through a temporary file in the same folder."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(handle)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_cached(path: Path) -> Any | None:
    """The object saved at ``path``, or None when absent or unreadable.

    An unreadable file (e.g. written by an incompatible torch) is treated as a
    miss, so the caller rebuilds and overwrites it.
    """
    if not path.is_file():
        return None
    import torch

    try:
        return torch.load(path, weights_only=True)
    except Exception as exc:  # any failure means: rebuild
        warnings.warn(f"Ignoring unreadable cache file {path}: {exc}", stacklevel=2)
        return None
