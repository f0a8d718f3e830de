"""Checkpoints of long runs: written whole or not at all, keyed by the run's configuration, loaded safely.

One mechanism for every training loop (the gradient flows, SGD, the image trainings). A checkpoint file holds
``{"format": FORMAT, "key": {...}, "state": {...}}``:

- :func:`save` writes a temporary file beside the target, flushes it to disk and renames it over the target, so
  a run killed at any moment leaves either the previous checkpoint or the new one, never half a file;
- :func:`load` reads it with ``torch.load(weights_only=True)`` (tensors, numbers, strings, lists and dicts only:
  a checkpoint cannot run code) and returns its state only if its key equals the run's configuration. A file
  that cannot be read is moved aside (``*.corrupt``) with a warning and the run starts afresh; a file written
  by another configuration raises :class:`StaleCheckpointError` naming it and the settings that differ.
- :func:`path` names the file from a readable stem and a hash of the key, so different configurations never
  share a file in one cache folder; :func:`digest` condenses tensors (the starting weights, the data) into a key
  entry.

NumPy arrays in a state (the recorders' histories) are stored as tensors and come back as arrays.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

__all__ = ["FORMAT", "StaleCheckpointError", "digest", "path", "save", "load"]

FORMAT = "resnode.checkpoint/1"


class StaleCheckpointError(ValueError):
    """A checkpoint was written by a run with another configuration."""


def _canonical(key: Mapping) -> str:
    return json.dumps(key, sort_keys=True, default=str)


def digest(value) -> str:
    """A SHA-256 digest (16 hex digits) of tensors, arrays, numbers and strings, nested in dicts (in key order),
    lists and tuples: what a run starts from (weights, data), condensed into an entry of its key."""
    hasher = hashlib.sha256()

    def feed(item) -> None:
        if isinstance(item, torch.Tensor):
            item = item.detach().cpu().contiguous()
            hasher.update(f"tensor{item.dtype}{tuple(item.shape)}".encode())
            hasher.update(item.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(item, np.ndarray):
            feed(torch.from_numpy(np.ascontiguousarray(item)))
        elif isinstance(item, Mapping):
            for name in item:
                hasher.update(repr(name).encode())
                feed(item[name])
        elif isinstance(item, (list, tuple)):
            hasher.update(f"{type(item).__name__}{len(item)}".encode())
            for element in item:
                feed(element)
        else:
            hasher.update(repr(item).encode())

    feed(value)
    return hasher.hexdigest()[:16]


def _encode(value):
    """``value`` with every NumPy array replaced by ``{"numpy": tensor}`` (``torch.load(weights_only=True)`` reads
    tensors, not arrays) and NumPy scalars by Python numbers."""
    if isinstance(value, np.ndarray):
        return {"numpy": torch.from_numpy(np.array(value))}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {name: _encode(item) for name, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_encode(item) for item in value)
    return value


def _decode(value):
    if isinstance(value, dict):
        if set(value) == {"numpy"} and isinstance(value["numpy"], torch.Tensor):
            return value["numpy"].numpy()
        return {name: _decode(item) for name, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_decode(item) for item in value)
    return value


def path(folder: str | os.PathLike, stem: str, key: Mapping) -> Path:
    """``folder/<stem>-<hash of key>.pt``: one file per configuration."""
    digest = hashlib.sha256(_canonical(key).encode()).hexdigest()[:12]
    return Path(folder) / f"{stem}-{digest}.pt"


def save(target: str | os.PathLike, state: Mapping, key: Mapping) -> Path:
    """Write ``state`` (tensors, numbers, strings, lists, dicts) under ``key`` to ``target``, atomically."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as handle:
            torch.save({"format": FORMAT, "key": json.loads(_canonical(key)), "state": _encode(dict(state))}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself reaches the disk
    finally:
        os.close(directory)
    return target


def load(target: str | os.PathLike, key: Mapping) -> dict | None:
    """The state saved at ``target`` under ``key``; ``None`` if there is none, or if the file was unreadable (it is
    then moved aside to ``<name>.corrupt`` with a warning). Raises :class:`StaleCheckpointError` if the file holds
    another configuration's run."""
    target = Path(target)
    if not target.exists():
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's note on pickle protocols of foreign files
            payload = torch.load(target, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != FORMAT or "state" not in payload:
            raise ValueError(f"not a resnode checkpoint (format {payload.get('format') if isinstance(payload, dict) else None!r})")
    except Exception as error:  # truncated, corrupted, or not ours: never adopted
        aside = target.with_name(f"{target.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(target, aside)
        warnings.warn(f"resnode: the checkpoint {target} could not be read ({type(error).__name__}: "
                      f"{str(error)[:200]}); moved it to {aside.name} and starting this run afresh",
                      RuntimeWarning, stacklevel=2)
        return None
    expected = json.loads(_canonical(key))
    if payload.get("key") != expected:
        stored = payload.get("key") or {}
        differ = sorted(k for k in set(stored) | set(expected) if stored.get(k) != expected.get(k))
        raise StaleCheckpointError(
            f"the checkpoint {target} was written by a run with other settings ({', '.join(differ)} differ: "
            f"{ {k: stored.get(k) for k in differ} } there, { {k: expected.get(k) for k in differ} } here). "
            "Delete it, or give this run another cache folder.")
    return _decode(payload["state"])
