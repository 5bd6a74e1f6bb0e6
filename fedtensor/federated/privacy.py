"""Differentially private federated training: what ``ft.fit(..., dp=...)`` does, and its ε.

Theory of operation
-------------------
Three mechanisms, each opt-in; :func:`fedtensor.fit` takes one or a sequence of them
as ``dp``, at most one user-level (:class:`CentralDP` or :class:`LocalDP`) with, or
without, the example-level :class:`DPSGD`:

:class:`CentralDP` (user-level, trusted aggregator; McMahan et al., 2018, "DP-FedAvg")
    The aggregator (this process) clips each worker's update, the difference between
    the state it sent back and the global state over every floating-point entry, to
    ``clip_norm``, sums the clipped updates, adds Gaussian noise of standard deviation
    ``noise_multiplier * clip_norm`` to the sum and divides by the number of updates:
    every worker weighs the same (a weight by examples would let one worker's data
    move the sum by more than the bound). The strategy then sees that one noised
    average, so FedAvgM and FedAdam act on the private pseudo-gradient. With
    :class:`AdaptiveClipping` the bound follows a quantile of the update norms
    (Andrew et al., 2021): each round ``clip *= exp(-lr * (b - target_quantile))``
    where ``b`` is the noised fraction of updates that were within the bound; that
    count's noise is paid for by a slightly larger noise on the sum, so that the two
    together cost what a Gaussian of ``noise_multiplier`` costs.
:class:`LocalDP` (user-level, no trust in the aggregator)
    Each worker clips and noises its own update before it leaves
    (:mod:`fedtensor.worker.dp`).
:class:`DPSGD` (example-level; Abadi et al., 2016)
    Each worker trains with per-example clipped, noised gradients on Poisson-sampled
    batches (:mod:`fedtensor.worker.dp`): one example's influence is bounded, whoever
    sees the worker's updates.

Accounting is Google's ``dp_accounting`` (the ``dp`` extra), its RDP accountant, never
arithmetic of our own. Every round adds its event and :class:`RoundMetrics` carries
the ε reached at each mechanism's δ (``epsilon`` user-level, ``example_epsilon``
example-level). The events:

* central DP, every worker sampled each round (``fraction`` that rounds up to all of
  them): a Gaussian of ``noise_multiplier`` per round under add-or-remove-one-worker.
  Otherwise the round samples a fixed number of workers without replacement, which the
  accountant knows under replace-one-worker, where one worker moves the sum by up to
  ``2 * clip_norm``: ``SampledWithoutReplacement(workers alive, sampled,
  Gaussian(noise_multiplier / 2))``. A skipped round releases nothing and costs nothing.
* local DP: per worker, a Gaussian of ``noise_multiplier / 2`` (any two updates of one
  worker are up to ``2 * clip_norm`` apart) per round the worker was sampled in; the ε
  reported is the largest over the workers.
* DP-SGD: per worker, ``PoissonSampled(q, Gaussian(noise_multiplier))`` per local step,
  ``q = batch_size / examples``; the largest over the workers.

With secure aggregation (``ft.SecAggPlus``) the aggregator never sees an un-noised sum:
central DP's clipping and noise move to the workers (:meth:`PrivacyRun.secure_arguments`,
handed to SecAgg+'s masking step), each adding ``1/n`` of the variance for the ``n``
sampled, every update weighing 1; a round is charged for the noise of the workers whose
masked updates were summed (``noise_multiplier * sqrt(survivors / n)``).

With ``target_epsilon``, :func:`fit` computes before each round the ε the round would
bring (its sample is known in advance) and stops before a round that would pass the
budget (assuming, under secure aggregation, that every sampled worker survives); it
refuses to start if the first would. ``for_epsilon`` on each mechanism
finds the noise multiplier that a number of rounds can afford (the library's
calibration, a bisection over the accountant).

What is not private: the workers' reported training loss, accuracy and example counts
(statistics the progress lines show) are sent in the clear.
"""

from __future__ import annotations

import copy
import math
import secrets
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedtensor.worker.dp import clip_to_norm

__all__ = [
    "DPSGD",
    "AdaptiveClipping",
    "CentralDP",
    "LocalDP",
    "PrivacyRun",
    "dp_accounting_module",
]

State = dict[str, torch.Tensor]


def dp_accounting_module() -> Any:
    """The ``dp_accounting`` package, or an ImportError that says how to install it."""
    try:
        import dp_accounting  # type: ignore[import-untyped]
    except ImportError as exc:
        raise ImportError(
            "differential privacy accounting needs dp-accounting: pip install 'fedtensor[dp]'"
        ) from exc
    return dp_accounting


def _check_mechanism(clip_norm: float, noise_multiplier: float, delta: float, what: str) -> None:
    if not (isinstance(clip_norm, (int, float)) and math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"{what}: clip_norm must be a finite number > 0, not {clip_norm!r}")
    if not (
        isinstance(noise_multiplier, (int, float))
        and math.isfinite(noise_multiplier)
        and noise_multiplier >= 0
    ):
        raise ValueError(
            f"{what}: noise_multiplier must be a finite number >= 0, not {noise_multiplier!r}"
        )
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"{what}: delta must be in (0, 1), not {delta!r}")


@dataclass(frozen=True)
class AdaptiveClipping:
    """Andrew et al. (2021)'s clipping bound that tracks a quantile of the update norms.

    ``count_noise_std``: the standard deviation of the noise on the number of updates
    within the bound (default: the number of workers sampled per round / 20, the
    paper's choice).
    """

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise_std: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.target_quantile < 1:
            raise ValueError("AdaptiveClipping: target_quantile must be in (0, 1)")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError("AdaptiveClipping: learning_rate must be > 0")
        if self.count_noise_std is not None and not self.count_noise_std > 0:
            raise ValueError("AdaptiveClipping: count_noise_std must be > 0")


@dataclass(frozen=True)
class CentralDP:
    """User-level DP by the aggregator: clip each worker's update, noise the sum.

    ``clip_norm`` is the bound (the initial one with ``adaptive``); the noise on the
    sum has standard deviation ``noise_multiplier * clip_norm``.
    """

    noise_multiplier: float
    clip_norm: float = 1.0
    adaptive: AdaptiveClipping | None = None
    delta: float = 1e-5

    def __post_init__(self) -> None:
        _check_mechanism(self.clip_norm, self.noise_multiplier, self.delta, "CentralDP")

    def noisy_sum(
        self, clipped: Sequence[Mapping[str, torch.Tensor]], std: float, generator: torch.Generator
    ) -> State:
        """The sum of the ``clipped`` updates plus Gaussian noise of ``std`` (float64)."""
        first = clipped[0]
        total = {key: torch.zeros(value.shape, dtype=torch.float64) for key, value in first.items()}
        for update in clipped:
            for key, value in update.items():
                total[key] += value.double()
        for value in total.values():
            value += torch.normal(0.0, std, value.shape, generator=generator, dtype=torch.float64)
        return total

    @classmethod
    def for_epsilon(
        cls,
        epsilon: float,
        *,
        rounds: int,
        workers: int,
        sampled: int | None = None,
        clip_norm: float = 1.0,
        adaptive: AdaptiveClipping | None = None,
        delta: float = 1e-5,
    ) -> CentralDP:
        """The mechanism whose noise lets ``rounds`` rounds, ``sampled`` of ``workers``
        workers each (all by default), reach ``epsilon`` at ``delta``."""
        sampled = workers if sampled is None else sampled
        relation, event = _central_event(workers, sampled)
        multiplier = _calibrate(epsilon, delta, relation, lambda z: _repeat(event(z), rounds))
        return cls(multiplier, clip_norm, adaptive, delta)


@dataclass(frozen=True)
class LocalDP:
    """User-level DP on each worker: it clips and noises its own update."""

    clip_norm: float
    noise_multiplier: float
    delta: float = 1e-5

    def __post_init__(self) -> None:
        _check_mechanism(self.clip_norm, self.noise_multiplier, self.delta, "LocalDP")

    @classmethod
    def for_epsilon(
        cls, epsilon: float, *, rounds: int, clip_norm: float = 1.0, delta: float = 1e-5
    ) -> LocalDP:
        """The mechanism that reaches ``epsilon`` at ``delta`` for a worker in ``rounds`` rounds."""
        multiplier = _calibrate(
            epsilon, delta, "replace", lambda z: _repeat(_local_event(z), rounds)
        )
        return cls(clip_norm, multiplier, delta)


@dataclass(frozen=True)
class DPSGD:
    """Example-level DP: DP-SGD on every worker (per-example clipping, noised gradients)."""

    clip_norm: float
    noise_multiplier: float
    delta: float = 1e-5

    def __post_init__(self) -> None:
        _check_mechanism(self.clip_norm, self.noise_multiplier, self.delta, "DPSGD")

    @classmethod
    def for_epsilon(
        cls,
        epsilon: float,
        *,
        rounds: int,
        examples: int,
        batch_size: int,
        epochs: int = 1,
        clip_norm: float = 1.0,
        delta: float = 1e-5,
    ) -> DPSGD:
        """The mechanism that reaches ``epsilon`` at ``delta`` for a worker holding
        ``examples`` examples that takes part in all ``rounds`` rounds."""
        rate, steps = dp_sgd_schedule(examples, batch_size, epochs)
        multiplier = _calibrate(
            epsilon, delta, "add_remove", lambda z: _repeat(_dp_sgd_event(z, rate, steps), rounds)
        )
        return cls(clip_norm, multiplier, delta)


Mechanism = CentralDP | LocalDP | DPSGD


def dp_sgd_schedule(examples: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """DP-SGD's sampling rate and steps per round on a worker (as :mod:`fedtensor.worker.dp`)."""
    rate = min(1.0, batch_size / examples) if examples else 1.0
    return rate, epochs * max(1, round(examples / batch_size))


# -- events and accountants ------------------------------------------------------------------------


def _repeat(event: Any, count: int) -> Any:
    return dp_accounting_module().SelfComposedDpEvent(event, count)


def _central_event(workers: int, sampled: int) -> tuple[str, Callable[[float], Any]]:
    """The neighbouring relation central DP is accounted under, and its event per round,
    for ``sampled`` of ``workers`` workers per round."""
    relation = "add_remove" if sampled >= workers else "replace"
    return relation, lambda z: _central_round(relation, workers, sampled, z)


def _central_round(relation: str, alive: int, sampled: int, noise_multiplier: float) -> Any:
    """One central-DP round's event under ``relation``."""
    dpa = dp_accounting_module()
    if relation == "add_remove":  # every worker, every round
        return dpa.GaussianDpEvent(noise_multiplier)
    # Replace-one: a worker moves the clipped sum by up to twice the bound.
    gaussian = dpa.GaussianDpEvent(noise_multiplier / 2)
    if sampled >= alive:
        return gaussian
    return dpa.SampledWithoutReplacementDpEvent(alive, sampled, gaussian)


def _local_event(noise_multiplier: float) -> Any:
    return dp_accounting_module().GaussianDpEvent(noise_multiplier / 2)


def _dp_sgd_event(noise_multiplier: float, rate: float, steps: int) -> Any:
    dpa = dp_accounting_module()
    step = dpa.GaussianDpEvent(noise_multiplier)
    if rate < 1:
        step = dpa.PoissonSampledDpEvent(rate, step)
    return dpa.SelfComposedDpEvent(step, steps)


def _accountant(relation: str) -> Any:
    dpa = dp_accounting_module()
    neighbours = dpa.NeighboringRelation
    return dpa.rdp.RdpAccountant(
        neighboring_relation=(
            neighbours.REPLACE_ONE if relation == "replace" else neighbours.ADD_OR_REMOVE_ONE
        )
    )


def _calibrate(epsilon: float, delta: float, relation: str, event: Callable[[float], Any]) -> float:
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"the target epsilon must be > 0, not {epsilon!r}")
    dpa = dp_accounting_module()
    return float(
        dpa.calibrate_dp_mechanism(
            lambda: _accountant(relation),
            event,
            epsilon,
            delta,
            dpa.ExplicitBracketInterval(1e-3, 1e3),
            tol=1e-4,
        )
    )


# A round's event as plain data (a checkpoint keeps these, not the library's objects):
# ["central", relation, alive, sampled, noise_multiplier], ["local", noise_multiplier]
# or ["dp_sgd", noise_multiplier, sampling_rate, steps].
PlainEvent = list[Any]


def _event(plain: Sequence[Any]) -> Any:
    """The ``dp_accounting`` event a :data:`PlainEvent` stands for."""
    kind = plain[0] if plain else None
    if kind == "central" and len(plain) == 5:
        return _central_round(str(plain[1]), int(plain[2]), int(plain[3]), float(plain[4]))
    if kind == "local" and len(plain) == 2:
        return _local_event(float(plain[1]))
    if kind == "dp_sgd" and len(plain) == 4:
        return _dp_sgd_event(float(plain[1]), float(plain[2]), int(plain[3]))
    raise ValueError(f"not a privacy event of a fedtensor checkpoint: {plain!r}")


class _Ledger:
    """One guarantee's accountants: one for the run (key None) or one per worker.

    It also keeps every event it composed, as plain data, so that a checkpoint can
    hold the accounting and a resumed run replays it into fresh accountants (in the
    same order: the same ε to the last bit).
    """

    def __init__(self, relation: str, delta: float) -> None:
        self.relation = relation
        self.delta = delta
        self._accountants: dict[Hashable, Any] = {}
        self.events: dict[Hashable, list[PlainEvent]] = {}

    def epsilon(self, events: Mapping[Hashable, PlainEvent] | None = None) -> float:
        """The largest ε so far, or (``events``) as it would be after those events."""
        accountants = dict(self._accountants)
        for key, event in (events or {}).items():
            accountant = copy.deepcopy(accountants.get(key) or _accountant(self.relation))
            accountant.compose(_event(event))
            accountants[key] = accountant
        return max(
            (float(accountant.get_epsilon(self.delta)) for accountant in accountants.values()),
            default=0.0,
        )

    def compose(self, events: Mapping[Hashable, PlainEvent]) -> None:
        for key, event in events.items():
            self._accountants.setdefault(key, _accountant(self.relation)).compose(_event(event))
            self.events.setdefault(key, []).append(list(event))

    def state_dict(self) -> dict[str, Any]:
        """The events so far, by accountant (``"run"`` or a worker's index as a string)."""
        return {
            "relation": self.relation,
            "events": {
                "run" if key is None else str(key): [list(e) for e in events]
                for key, events in self.events.items()
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replay the events of :meth:`state_dict` into fresh accountants."""
        if state.get("relation") != self.relation:
            raise ValueError(
                f"the checkpoint's privacy was accounted under {state.get('relation')!r}, "
                f"this run's under {self.relation!r} (a different fraction or aggregation)"
            )
        self._accountants = {}
        self.events = {}
        for name, events in dict(state.get("events", {})).items():
            key: Hashable = None if name == "run" else int(name)
            for event in events:
                self.compose({key: event})


# -- a run -----------------------------------------------------------------------------------------


class PrivacyRun:
    """What :func:`fedtensor.fit` keeps of its ``dp`` during one run: accountants, the bound."""

    def __init__(
        self,
        dp: Mechanism | Sequence[Mechanism],
        *,
        target_epsilon: float | None,
        workers: int,
        sampled: int,
        trainable: Sequence[str],
        model: torch.nn.Module,
        fraction: float,
        secure: bool = False,
    ) -> None:
        mechanisms = [dp] if isinstance(dp, (CentralDP, LocalDP, DPSGD)) else list(dp)
        if not mechanisms or not all(
            isinstance(m, (CentralDP, LocalDP, DPSGD)) for m in mechanisms
        ):
            raise ValueError("dp is ft.CentralDP, ft.LocalDP, ft.DPSGD, or a sequence of them")
        users = [m for m in mechanisms if isinstance(m, (CentralDP, LocalDP))]
        examples = [m for m in mechanisms if isinstance(m, DPSGD)]
        if len(users) > 1 or len(examples) > 1:
            raise ValueError(
                "dp takes at most one user-level mechanism (CentralDP or LocalDP) and one DPSGD"
            )
        if target_epsilon is not None and not (
            isinstance(target_epsilon, (int, float)) and target_epsilon > 0
        ):
            raise ValueError(f"target_epsilon must be > 0, not {target_epsilon!r}")
        if not trainable:
            raise ValueError("differential privacy needs a model with trainable parameters")
        self.user: CentralDP | LocalDP | None = users[0] if users else None
        self.example: DPSGD | None = examples[0] if examples else None
        if self.example is not None and any(
            isinstance(module, torch.nn.modules.batchnorm._BatchNorm) for module in model.modules()
        ):
            raise ValueError(
                "DP-SGD needs per-example gradients, which batch norm does not have "
                "(use torch.nn.GroupNorm or LayerNorm)"
            )
        if secure and isinstance(self.user, CentralDP) and self.user.adaptive is not None:
            raise ValueError(
                "adaptive clipping needs the update norms, which secure aggregation hides: "
                "give CentralDP a fixed clip_norm"
            )
        dp_accounting_module()  # fail now, not after the first round, if it is missing
        self.target_epsilon = target_epsilon
        self.fraction = fraction
        self._generator = torch.Generator().manual_seed(secrets.randbits(63))
        self.clip_norm = math.nan
        self._count_noise_std = 0.0
        self._update_noise_multiplier = 0.0
        self._user_ledger: _Ledger | None = None
        self._example_ledger: _Ledger | None = None
        if isinstance(self.user, CentralDP):
            self.clip_norm = float(self.user.clip_norm)
            # Every worker in every round (a fraction that rounds up to all of them stays so
            # as workers die): add/remove one; a sample: replace one (see the header).
            self._user_ledger = _Ledger(
                "add_remove" if sampled >= workers else "replace", self.user.delta
            )
            self._update_noise_multiplier = self.user.noise_multiplier
            if self.user.adaptive is not None:
                adaptive = self.user.adaptive
                self._count_noise_std = (
                    adaptive.count_noise_std
                    if adaptive.count_noise_std is not None
                    else sampled / 20
                )
                z = self.user.noise_multiplier
                if z > 0:
                    # Andrew et al.: the count (sensitivity 1/2) and the sum share the budget.
                    if 2 * self._count_noise_std <= z:
                        raise ValueError(
                            f"adaptive clipping: the count's noise ({self._count_noise_std:g}) "
                            f"must exceed noise_multiplier / 2 ({z / 2:g}); raise "
                            "count_noise_std or sample more workers"
                        )
                    self._update_noise_multiplier = (
                        z**-2 - (2 * self._count_noise_std) ** -2
                    ) ** -0.5
        elif isinstance(self.user, LocalDP):
            self._user_ledger = _Ledger("replace", self.user.delta)
        if self.example is not None:
            self._example_ledger = _Ledger("add_remove", self.example.delta)

    @property
    def central(self) -> CentralDP | None:
        return self.user if isinstance(self.user, CentralDP) else None

    def worker_arguments(self) -> dict[str, float]:
        """The keyword arguments of ``fedtensor.local_update`` that turn on worker-side DP."""
        arguments: dict[str, float] = {}
        if self.example is not None:
            arguments["dp_sgd_clip_norm"] = float(self.example.clip_norm)
            arguments["dp_sgd_noise_multiplier"] = float(self.example.noise_multiplier)
        if isinstance(self.user, LocalDP):
            arguments["dp_local_clip_norm"] = float(self.user.clip_norm)
            arguments["dp_local_noise_multiplier"] = float(self.user.noise_multiplier)
        return arguments

    def secure_arguments(self, sampled: int) -> dict[str, Any]:
        """Central DP under secure aggregation: what each worker's masking step takes.

        The aggregator never sees an un-noised sum: each of the ``sampled`` workers
        clips its update and adds Gaussian noise of variance ``sigma**2 / sampled``
        (``sigma = noise_multiplier * clip_norm``) before masking, and every update
        weighs 1. The sum of those that survive carries noise of variance
        ``sigma**2 * survivors / sampled``, which :meth:`account` charges for.
        """
        central = self.central
        if central is None:
            return {}
        return {
            "clip_norm": self.clip_norm,
            "noise_std": central.noise_multiplier * self.clip_norm / math.sqrt(sampled),
            "weight": 1,
        }

    # -- accounting ---------------------------------------------------------------------

    def _events(
        self,
        alive: int,
        sampled: Sequence[int],
        sizes: Mapping[int, int],
        epochs: int,
        batch_size: int,
        released: bool,
        schedules: Mapping[int, tuple[float, int]] | None = None,
        survivors: int | None = None,
    ) -> tuple[dict[Hashable, PlainEvent], dict[Hashable, PlainEvent]]:
        user: dict[Hashable, PlainEvent] = {}
        example: dict[Hashable, PlainEvent] = {}
        if isinstance(self.user, CentralDP) and released:
            assert self._user_ledger is not None
            multiplier = self.user.noise_multiplier
            if survivors is not None:  # distributed noise: only the survivors' part of it
                multiplier *= math.sqrt(min(survivors, len(sampled)) / len(sampled))
            relation = self._user_ledger.relation
            user[None] = ["central", relation, alive, len(sampled), float(multiplier)]
        elif isinstance(self.user, LocalDP):
            for index in sampled:
                user[index] = ["local", float(self.user.noise_multiplier)]
        if self.example is not None:
            for index in sampled:
                rate, steps = (schedules or {}).get(index) or dp_sgd_schedule(
                    sizes[index], batch_size, epochs
                )
                example[index] = [
                    "dp_sgd",
                    float(self.example.noise_multiplier),
                    float(rate),
                    int(steps),
                ]
        return user, example

    def would_exceed(
        self,
        alive: int,
        sampled: Sequence[int],
        sizes: Mapping[int, int],
        epochs: int,
        batch_size: int,
    ) -> str | None:
        """Why the round about to run would pass ``target_epsilon`` (None if it would not)."""
        if self.target_epsilon is None:
            return None
        user, example = self._events(alive, sampled, sizes, epochs, batch_size, True)
        for name, ledger, events in (
            ("epsilon", self._user_ledger, user),
            ("example-level epsilon", self._example_ledger, example),
        ):
            if ledger is not None:
                after = ledger.epsilon(events)
                if after > self.target_epsilon:
                    return (
                        f"the next round would bring the {name} to {after:.3g} "
                        f"(delta {ledger.delta:g}), past target_epsilon={self.target_epsilon:g}"
                    )
        return None

    def account(
        self,
        alive: int,
        sampled: Sequence[int],
        sizes: Mapping[int, int],
        epochs: int,
        batch_size: int,
        released: bool,
        replies: Mapping[int, Mapping[str, Any]],
        survivors: int | None = None,
    ) -> tuple[float, float]:
        """Add a finished round's events; the ε so far, user-level and example-level.

        ``survivors``: under secure aggregation, how many workers' noise the sum holds.
        """
        schedules = {
            index: (float(reply["dp_sampling_rate"]), int(reply["dp_steps"]))
            for index, reply in replies.items()
            if "dp_steps" in reply
        }
        user, example = self._events(
            alive, sampled, sizes, epochs, batch_size, released, schedules, survivors
        )
        epsilons = []
        for ledger, events in ((self._user_ledger, user), (self._example_ledger, example)):
            if ledger is None:
                epsilons.append(math.nan)
            else:
                ledger.compose(events)
                epsilons.append(ledger.epsilon())
        return epsilons[0], epsilons[1]

    # -- checkpoints --------------------------------------------------------------------

    def mechanisms(self) -> list[dict[str, Any]]:
        """The run's mechanisms as plain data (what a resumed run must match)."""
        described: list[dict[str, Any]] = []
        for mechanism in (self.user, self.example):
            if mechanism is None:
                continue
            fields = {
                "kind": type(mechanism).__name__,
                "noise_multiplier": float(mechanism.noise_multiplier),
                "clip_norm": float(mechanism.clip_norm),
                "delta": float(mechanism.delta),
            }
            if isinstance(mechanism, CentralDP) and mechanism.adaptive is not None:
                adaptive = mechanism.adaptive
                fields["adaptive"] = [
                    float(adaptive.target_quantile),
                    float(adaptive.learning_rate),
                    self._count_noise_std,
                ]
            described.append(fields)
        return described

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps so that a resumed run accounts as if it never stopped:
        the mechanisms, the events composed so far, the current clipping bound.

        The noise itself cannot be replayed: it comes from a generator seeded from the
        operating system's randomness (noise derived from a seed is no noise to whoever
        knows the seed), so a resumed run's weights differ from an uninterrupted run's
        by fresh noise; its ε and its clipping bound's continuation do not.
        """
        return {
            "mechanisms": self.mechanisms(),
            "clip_norm": float(self.clip_norm),
            "user": self._user_ledger.state_dict() if self._user_ledger is not None else None,
            "example": (
                self._example_ledger.state_dict() if self._example_ledger is not None else None
            ),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`; ValueError if it is another run's privacy."""
        saved = state.get("mechanisms")
        if saved != self.mechanisms():
            raise ValueError(
                f"the checkpoint was saved by a run with dp={saved!r}; this run has "
                f"dp={self.mechanisms()!r}: a private run resumes only with the same mechanisms"
            )
        for ledger, saved_ledger in (
            (self._user_ledger, state.get("user")),
            (self._example_ledger, state.get("example")),
        ):
            if ledger is not None:
                ledger.load_state_dict(saved_ledger or {})
        self.clip_norm = float(state["clip_norm"])

    # -- central DP's aggregation --------------------------------------------------------

    def aggregate(self, current: State, states: Sequence[Mapping[str, torch.Tensor]]) -> State:
        """Central DP: the global state moved by the noised mean of the clipped updates."""
        central = self.central
        assert central is not None
        keys = [key for key, value in current.items() if value.is_floating_point()]
        clip = self.clip_norm
        clipped: list[dict[str, torch.Tensor]] = []
        within = 0
        for state in states:
            update, norm = clip_to_norm({key: state[key] - current[key] for key in keys}, clip)
            clipped.append(update)
            within += norm <= clip
        total = central.noisy_sum(clipped, self._update_noise_multiplier * clip, self._generator)
        result = dict(current)
        for key in keys:
            mean = total[key] / len(states)
            result[key] = (current[key].double() + mean).to(current[key].dtype)
        if central.adaptive is not None:
            # The paper's centred count (each update adds +-1/2): sensitivity 1/2.
            noise = float(torch.normal(0.0, self._count_noise_std, (), generator=self._generator))
            fraction_within = (within - len(states) / 2 + noise) / len(states) + 0.5
            adaptive = central.adaptive
            self.clip_norm = clip * math.exp(
                -adaptive.learning_rate * (fraction_within - adaptive.target_quantile)
            )
        return result
