"""Checkpoints of ``fit``: written atomically after every epoch (temporary file, fsync, rename), so a run
killed at any moment resumes from its last finished epoch; read with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (corrupted, of another model or schedule, or would be overwritten)."""


def atomic_write(path: Path, write) -> None:
    """``write(file)`` into a temporary file beside ``path``, fsync, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def check_writable(path: str | os.PathLike) -> None:
    """Make sure ``path`` (a checkpoint, a saved run) can be written — its folder created, a file written
    there — before any work is done; raise :class:`CheckpointError` naming the folder and the fix
    otherwise."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a file name: give one, e.g. {path / 'run.ckpt'}")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.probe"):
            pass
    except OSError as err:
        raise CheckpointError(
            f"cannot write {path}: its folder {folder} cannot be created or written "
            f"({type(err).__name__}: {err}). Choose a folder you can write to. "
            f"（提示：这个文件夹无法创建或写入 (folder not writable)）"
        ) from err


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer, history, schedule) -> None:
    """Model, optimizer, history, schedule and RNG states, written atomically (readable with
    ``weights_only=True``)."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "history": json.dumps(history.to_dict()),
        "schedule": json.dumps(schedule.to_dict()),
        "epoch": len(history),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint written by :func:`save_checkpoint` (its history a ``train.History``, its schedule a
    ``finetune.Schedule``); errors name the file."""
    from ..finetune import Schedule
    from ..train import History

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state["history"] = History.from_dict(json.loads(state["history"]))
        state["schedule"] = Schedule.from_dict(json.loads(state["schedule"]))
    except Exception as err:
        raise CheckpointError(
            f"cannot resume from {path}: not a readable course checkpoint ({err}). "
            f"Move it away to start afresh."
        ) from err
    return state


def start_or_resume(
    checkpoint, resume: bool, model: nn.Module, optimizer, schedule, history, bn_policy, bn_batches
):
    """Before ``fit``'s first epoch: the history to continue. A new run (no checkpoint file yet) gets
    ``history``; with ``resume=True`` an existing ``checkpoint`` puts its model, optimizer, RNG states and
    history back. Refused with a :class:`CheckpointError` before any training: a checkpoint that would be
    overwritten, one of another schedule, model or BatchNorm policy, a folder that cannot be written."""
    if checkpoint is None:
        if resume:
            raise ValueError("resume=True needs checkpoint=<path>")
        return history
    checkpoint = Path(checkpoint)
    check_writable(checkpoint)  # before any epoch, not after the first one
    if not checkpoint.exists():
        return history
    if not resume:
        raise CheckpointError(
            f"checkpoint {checkpoint} already exists: pass resume=True to continue that run, "
            f"or choose another path (it is never overwritten by a new run)"
        )
    state = load_checkpoint(checkpoint)
    if state["schedule"] != schedule:
        raise CheckpointError(
            f"checkpoint {checkpoint} was written by another schedule "
            f"({state['schedule'].to_dict()}); resume with that schedule or use another path"
        )
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {checkpoint} belongs to another model: {err}") from err
    saved = state["history"]
    saved_bn = (saved.meta.get("bn_policy", "train"), saved.meta.get("bn_batches", bn_batches))
    if saved_bn != (bn_policy, bn_batches):
        raise CheckpointError(
            f"checkpoint {checkpoint} was written with bn_policy={saved_bn[0]!r}, "
            f"bn_batches={saved_bn[1]}; resume with those or use another path"
        )
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return saved
