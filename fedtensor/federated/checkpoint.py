"""Checkpoints of a federated run: the global model, the strategy's state and the
history after a round, so that a stopped run resumes where it stopped.

A checkpoint is a ``torch.save`` file of plain data (tensors, numbers, strings,
lists and dicts), loaded back with ``weights_only=True``: loading a checkpoint,
which may come from anywhere, never unpickles objects or runs code. It records
the run's ``seed`` and strategy, and :func:`load` refuses a checkpoint of a
different run, since a resumed run reproduces an uninterrupted one only with the
same seed (everything random in :func:`fedtensor.fit` derives from the seed and
the round). :func:`save` writes beside the target and renames, so a run stopped
mid-write leaves the last good checkpoint in place. A private run's accounting
(:meth:`fedtensor.federated.privacy.PrivacyRun.state_dict`: its mechanisms, DP events
and clipping bound, as plain numbers and strings) travels in ``extra["privacy"]``, a
sampling other than uniform in ``extra["sampling"]``.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from fedtensor.errors import FedTensorError
from fedtensor.federated.progress import History, RoundMetrics
from fedtensor.federated.strategies import Strategy

__all__ = ["FORMAT", "load", "save"]

FORMAT = 1


def save(
    path: Path,
    round: int,
    model: torch.nn.Module,
    strategy: Strategy,
    history: History,
    seed: int,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the state after ``round`` to ``path``.

    ``extra``: more plain data the run needs to resume (an asynchronous run's
    updates in flight), given back by :func:`load`.
    """
    payload = {
        "format": FORMAT,
        "round": round,
        "seed": seed,
        "strategy": type(strategy).__name__,
        "model": model.state_dict(),
        "strategy_state": strategy.state_dict(),
        "history": [_plain(asdict(m)) for m in history],
        "extra": extra or {},
    }
    # Written beside and renamed: a run stopped mid-write leaves the last good checkpoint.
    partial = path.with_name(path.name + ".partial")
    torch.save(payload, partial)
    os.replace(partial, path)


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    return {
        key: list(value) if isinstance(value, tuple) else value for key, value in values.items()
    }


def load(
    path: Path,
    model: torch.nn.Module,
    strategy: Strategy,
    history: History,
    seed: int,
    extra: dict[str, Any] | None = None,
) -> int:
    """Load a checkpoint into ``model``, ``strategy`` and ``history``; the round it holds.

    No file: nothing is loaded, and the round is 0. ``extra`` is filled with what
    :func:`save` was given as its ``extra``.
    """
    if not path.exists():
        return 0
    # weights_only: a checkpoint is data, and loading it must not run code.
    payload = torch.load(path, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise FedTensorError(f"{path} is not a fedtensor checkpoint")
    if payload["seed"] != seed or payload["strategy"] != type(strategy).__name__:
        raise FedTensorError(
            f"{path} was saved by a run with seed {payload['seed']} and "
            f"{payload['strategy']}; this run has seed {seed} and {type(strategy).__name__}"
        )
    model.load_state_dict(payload["model"])
    strategy.load_state_dict(payload["strategy_state"])
    for values in payload["history"]:
        # Tuples were saved as lists (_plain): every list field is a tuple again.
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        history.append(RoundMetrics(**values))
    if extra is not None:
        extra.update(payload.get("extra", {}))
    return int(payload["round"])
