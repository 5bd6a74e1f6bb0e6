"""What a federated run reports: each round's :class:`RoundMetrics`, the run's
:class:`History`, and the live display of rounds while :func:`fedtensor.fit` runs.

:class:`ProgressDisplay` draws a bar per round on a terminal (redrawn in place as
workers answer) and writes one plain line per finished round elsewhere (a log
file, a notebook's captured stream), so that logs stay readable.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

__all__ = ["History", "ProgressDisplay", "RoundMetrics"]


@dataclass(frozen=True)
class RoundMetrics:
    """What happened in one round."""

    round: int
    #: Worker ids sampled, and those whose update was aggregated.
    sampled: tuple[str, ...]
    completed: tuple[str, ...]
    #: Worker id -> why it gave no update (died, timed out, failed).
    failed: dict[str, str] = field(default_factory=dict)
    #: True when fewer than ``min_workers`` answered: the model was left unchanged.
    skipped: bool = False
    train_loss: float = math.nan
    train_accuracy: float = math.nan
    eval_loss: float = math.nan
    eval_accuracy: float = math.nan
    #: Wall-clock seconds of the round, and the longest local training in it.
    seconds: float = 0.0
    compute_seconds: float = 0.0
    #: Mean over workers of (time to the update - the worker's training time):
    #: sending the model, queueing, bringing the update back.
    transfer_seconds: float = 0.0
    #: Tensor bytes of model state sent to, and received from, the workers.
    bytes_sent: int = 0
    bytes_received: int = 0


class History(Sequence[RoundMetrics]):
    """The metrics of every round so far, in order."""

    def __init__(self, rounds: Sequence[RoundMetrics] = ()) -> None:
        self._rounds = list(rounds)

    def __len__(self) -> int:
        return len(self._rounds)

    def __getitem__(self, index: Any) -> Any:
        return self._rounds[index]

    def __iter__(self) -> Iterator[RoundMetrics]:
        return iter(self._rounds)

    def append(self, metrics: RoundMetrics) -> None:
        self._rounds.append(metrics)

    def __repr__(self) -> str:
        return f"<History of {len(self)} rounds>"

    def table(self) -> str:
        """The rounds as a plain-text table."""
        lines = [
            "round  workers  train loss  train acc  eval loss  eval acc  seconds",
        ]
        for m in self._rounds:
            workers = f"{len(m.completed)}/{len(m.sampled)}" + ("*" if m.skipped else "")
            train_accuracy, eval_accuracy = _percent(m.train_accuracy), _percent(m.eval_accuracy)
            lines.append(
                f"{m.round:>5}  {workers:>7}  {m.train_loss:>10.4f}  {train_accuracy:>9}"
                f"  {m.eval_loss:>9.4f}  {eval_accuracy:>8}  {m.seconds:>7.2f}"
            )
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Write the loss and accuracy curves to a PNG at ``path`` (needs matplotlib)."""
        try:
            import matplotlib

            matplotlib.use("Agg", force=True)
            import matplotlib.pyplot as plt
        except ImportError as exc:
            raise ImportError(
                "History.plot needs matplotlib: pip install 'fedtensor[plot]'"
            ) from exc
        rounds = [m.round for m in self._rounds]
        figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4))
        loss_axes.plot(rounds, [m.train_loss for m in self._rounds], label="train (workers)")
        loss_axes.plot(rounds, [m.eval_loss for m in self._rounds], label="held-out")
        loss_axes.set_xlabel("round")
        loss_axes.set_ylabel("loss")
        loss_axes.legend()
        accuracy_axes.plot(
            rounds, [m.train_accuracy for m in self._rounds], label="train (workers)"
        )
        accuracy_axes.plot(rounds, [m.eval_accuracy for m in self._rounds], label="held-out")
        accuracy_axes.set_xlabel("round")
        accuracy_axes.set_ylabel("accuracy")
        accuracy_axes.legend()
        figure.tight_layout()
        target = Path(path)
        figure.savefig(target, format="png")
        plt.close(figure)
        return target


def _percent(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.1f}%"


class ProgressDisplay:
    """A bar per round on a terminal; a plain line per round elsewhere."""

    WIDTH = 20

    def __init__(self, rounds: int, progress: bool | IO[str]) -> None:
        """``progress`` is :func:`fedtensor.fit`'s: ``True`` (standard error), ``False``
        (nothing shown) or a stream."""
        self.rounds = rounds
        self.stream: IO[str] | None = sys.stderr if progress is True else (progress or None)
        self.tty = self.stream is not None and self.stream.isatty()

    def update(self, round: int, done: int, sampled: int) -> None:
        """``done`` of the ``sampled`` workers of ``round`` answered (redraws the bar)."""
        if self.stream is None or not self.tty:
            return
        filled = self.WIDTH * done // max(sampled, 1)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        self.stream.write(f"\rround {round:>3}/{self.rounds} [{bar}] {done}/{sampled} workers")
        self.stream.flush()

    def finished(self, m: RoundMetrics) -> None:
        """Round ``m.round`` is over: its line, in full."""
        if self.stream is None:
            return
        parts = [f"{len(m.completed)}/{len(m.sampled)} workers"]
        if m.skipped:
            parts.append("skipped (too few updates)")
        if not math.isnan(m.train_loss):
            parts.append(f"train loss {m.train_loss:.4f}")
        if not math.isnan(m.eval_loss):
            parts.append(f"eval loss {m.eval_loss:.4f}, eval acc {_percent(m.eval_accuracy)}")
        parts.append(f"{m.seconds:.2f} s")
        if self.tty:
            bar = "#" * self.WIDTH
            line = f"\rround {m.round:>3}/{self.rounds} [{bar}] " + " · ".join(parts)
        else:
            line = f"round {m.round}/{self.rounds}: " + ", ".join(parts)
        self.stream.write(line + "\n")
        self.stream.flush()
