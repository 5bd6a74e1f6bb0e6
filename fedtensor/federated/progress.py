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
    #: Differential privacy (``dp``): the ε spent so far, at the mechanism's δ, by the
    #: user-level mechanism (CentralDP, LocalDP) and by DP-SGD (example-level); NaN
    #: without one. Central DP's clipping bound in this round (it moves if adaptive).
    epsilon: float = math.nan
    example_epsilon: float = math.nan
    clip_norm: float = math.nan
    #: Federated evaluation (``evaluate_fraction``): the global model after the round
    #: on the held-out parts of a sample of workers. Worker id -> (mean loss,
    #: accuracy, examples); the example-weighted mean loss and accuracy over them; the
    #: 10th, 50th and 90th percentiles of per-client loss and accuracy.
    client_eval: dict[str, tuple[float, float, int]] = field(default_factory=dict)
    client_eval_loss: float = math.nan
    client_eval_accuracy: float = math.nan
    client_eval_loss_quantiles: tuple[float, ...] = ()
    client_eval_accuracy_quantiles: tuple[float, ...] = ()
    #: Asynchronous training (FedBuff, FedAsync), where a round is one model version
    #: (``round`` its number): the updates it aggregated, in the order they arrived,
    #: by worker id; the version each started from; their staleness (this version
    #: - 1 - that one); when each arrived, in seconds since the run (or resume) began.
    arrivals: tuple[str, ...] = ()
    base_versions: tuple[int, ...] = ()
    staleness: tuple[int, ...] = ()
    arrival_seconds: tuple[float, ...] = ()
    #: Secure aggregation (``secure_aggregation``): figures of the round's masked sum
    #: (``quantization_step``: the largest error quantization adds to a coordinate of
    #: the average; ``clipped``: how many coordinates were clipped, over all workers;
    #: ``neighbours``, ``threshold``, ``dropped``), and why a skipped round was skipped.
    secure_aggregation: dict[str, float] = field(default_factory=dict)
    skip_reason: str = ""


class History(Sequence[RoundMetrics]):
    """The metrics of every round so far, in order."""

    def __init__(self, rounds: Sequence[RoundMetrics] = ()) -> None:
        self._rounds = list(rounds)
        #: Why the run ended before its last round (a private run's budget), or None.
        self.stopped: str | None = None

    def __len__(self) -> int:
        return len(self._rounds)

    def __getitem__(self, index: Any) -> Any:
        return self._rounds[index]

    def __iter__(self) -> Iterator[RoundMetrics]:
        return iter(self._rounds)

    def append(self, metrics: RoundMetrics) -> None:
        self._rounds.append(metrics)

    def arrival_order(self) -> list[str]:
        """Asynchronous runs: every aggregated update's worker, in arrival order.

        ``ft.fit(..., arrival_order=history.arrival_order())`` replays it.
        """
        return [worker for m in self._rounds for worker in m.arrivals]

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
        _plot_client_eval(loss_axes, accuracy_axes, self._rounds)
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


def _client_eval_text(m: RoundMetrics) -> str:
    """Federated evaluation in a progress line: weighted mean, then p10/p50/p90."""
    text = f"clients ({len(m.client_eval)}) acc {_percent(m.client_eval_accuracy)}"
    if len(m.client_eval_accuracy_quantiles) == 3:
        low, median, high = (_percent(q) for q in m.client_eval_accuracy_quantiles)
        text += f" [p10 {low}, p50 {median}, p90 {high}]"
    return text + f", loss {m.client_eval_loss:.4f}"


def _plot_client_eval(loss_axes: Any, accuracy_axes: Any, rounds: Sequence[RoundMetrics]) -> None:
    """Federated evaluation on the plot: the weighted mean, the median, the p10-p90 band."""
    evaluated = [m for m in rounds if len(m.client_eval_accuracy_quantiles) == 3]
    if not evaluated:
        return
    x = [m.round for m in evaluated]
    for axes, mean, bands in (
        (loss_axes, "client_eval_loss", "client_eval_loss_quantiles"),
        (accuracy_axes, "client_eval_accuracy", "client_eval_accuracy_quantiles"),
    ):
        (line,) = axes.plot(x, [getattr(m, mean) for m in evaluated], label="clients (mean)")
        band = [getattr(m, bands) for m in evaluated]
        axes.plot(x, [q[1] for q in band], "--", color=line.get_color(), label="clients (median)")
        axes.fill_between(
            x,
            [q[0] for q in band],
            [q[2] for q in band],
            color=line.get_color(),
            alpha=0.2,
            label="clients (p10-p90)",
        )
        axes.legend()


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
        if m.staleness:
            parts.append(f"staleness {'/'.join(str(s) for s in m.staleness)}")
        if m.client_eval:
            parts.append(_client_eval_text(m))
        if not math.isnan(m.epsilon):
            parts.append(f"epsilon {m.epsilon:.3g}")
        if not math.isnan(m.example_epsilon):
            parts.append(f"example-level epsilon {m.example_epsilon:.3g}")
        parts.append(f"{m.seconds:.2f} s")
        if self.tty:
            bar = "#" * self.WIDTH
            line = f"\rround {m.round:>3}/{self.rounds} [{bar}] " + " · ".join(parts)
        else:
            line = f"round {m.round}/{self.rounds}: " + ", ".join(parts)
        self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        """A line about the run itself (why it stopped early)."""
        if self.stream is not None:
            self.stream.write(text + "\n")
            self.stream.flush()
