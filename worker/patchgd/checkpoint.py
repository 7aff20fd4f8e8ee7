"""Full training state on disk: written atomically, read back with ``weights_only=True``.

A checkpoint holds everything needed to continue a run as if it had never stopped: model,
optimizer and scheduler state, every random number generator (torch, CUDA, numpy, Python, the
patch sampler and the data loader's shuffler), the epoch/step counters, the metric history and
the config. Everything is stored as tensors or plain Python values so that the safe
``weights_only`` unpickler can read it: a checkpoint file never runs code when loaded.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError

FORMAT_VERSION = 1

log = logging.getLogger(__name__)


def capture_rng_state() -> dict[str, Any]:
    """Global RNG states (torch, CUDA, numpy, Python) as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back the global RNG states written by ``capture_rng_state``."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically: a crash leaves the old file or the new, never half.

    The bytes go to a temporary file in the same directory, are flushed and fsynced, then
    ``os.replace`` swaps it in (atomic on POSIX) and the directory entry is fsynced too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save({"format_version": FORMAT_VERSION, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with the safe unpickler; a file that is not one raises ``CheckpointError``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path.name} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable or unsafe file is the same problem for the caller
        raise CheckpointError(f"checkpoint {path.name} could not be read: {exc}") from exc
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path.name} is not a Tessera training checkpoint (format {FORMAT_VERSION})")
    return state


def find_latest_checkpoint(directory: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable checkpoint in ``directory`` (by step counter) and its state, or None.

    Every ``*.pt`` file there is tried; one that cannot be read (cut short by a crash, corrupt,
    not a checkpoint) is skipped with a warning, so a damaged ``last.pt`` falls back to the
    ``previous.pt`` it replaced. None when the directory holds no usable checkpoint.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    best: tuple[tuple[int, int, int], Path, dict[str, Any]] | None = None
    for path in sorted(directory.glob("*.pt")):
        try:
            state = load_checkpoint(path)
            key = (int(state["step"]), int(state["epoch"]), int(state.get("batch", 0)))
        except (CheckpointError, KeyError, TypeError, ValueError) as exc:
            log.warning("ignoring checkpoint %s: %s", path, exc)
            continue
        if best is None or key > best[0]:
            best = (key, path, state)
    if best is None:
        return None
    log.info("resuming from %s (step %d)", best[1], best[0][0])
    return best[1], best[2]
