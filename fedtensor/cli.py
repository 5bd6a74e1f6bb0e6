"""The ``fedtensor`` command: ``fedtensor worker`` runs a worker process.

    fedtensor worker --id bob --host 127.0.0.1 --port 8765
    fedtensor demo                   # federated training on digits (see fedtensor.demo)
    fedtensor demo --secure-aggregation   # the same, aggregated by SecAgg+

A worker can hold data sets of its own, which clients reach by name with
:func:`fedtensor.load_dataset`: ``--dataset NAME=FILE`` loads FILE, written by
``torch.save({"data": examples, "targets": labels}, FILE)``, with
``torch.load(weights_only=True)`` (no code runs).

The token comes from the environment (``FEDTENSOR_TOKEN``, or the variable
named by ``--token-env``) or from a file (``--token-file``), never from the
command line, where other users of the machine could read it. A worker without
a token must be asked for explicitly with ``--no-auth``.

The worker prints one line when it is ready (``fedtensor worker bob ready on
ws://127.0.0.1:8765``), stops cleanly on SIGINT or SIGTERM (commands already
received finish and are answered, then connections close), and exits with
status 2 and a one-line reason when its configuration is bad. With
``--stop-on-stdin-eof`` it also stops when its standard input ends: the parent
of :func:`fedtensor.local_workers` holds that pipe, so its workers go with it
however it dies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import re
import signal
import ssl
import sys
import threading
import time
from collections.abc import Mapping, Sequence

import anyio
import torch

from fedtensor.worker.scheduler import default_compute_threads
from fedtensor.worker.server import Limits, WorkerServer

__all__ = ["main"]

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class ConfigurationError(Exception):
    """A bad option: reported in one line, exit status 2."""


def _size(text: str) -> int:
    match = _SIZE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 1048576, 512M, 2G)")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def _quota(text: str) -> int | None:
    """A size, or ``none`` for no bound."""
    return None if text.strip().lower() == "none" else _size(text)


def _format_size(size: int | None) -> str:
    if size is None:
        return "none"
    if size >= 1 << 30:
        return f"{size / (1 << 30):.1f}G"
    return f"{size >> 20}M" if size >= 1 << 20 else str(size)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtensor", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "demo",
        help="train a small CNN federatedly on digits (fedtensor demo --help)",
        add_help=False,
    )
    worker = commands.add_parser("worker", help="run a worker process")
    worker.add_argument("--id", required=True, help="the worker's name")
    worker.add_argument("--host", default="127.0.0.1", help="address to listen on")
    worker.add_argument("--port", type=int, default=8765, help="port (0: any free port)")
    auth = worker.add_mutually_exclusive_group()
    auth.add_argument(
        "--token-env",
        default="FEDTENSOR_TOKEN",
        metavar="NAME",
        help="environment variable holding the token (default FEDTENSOR_TOKEN)",
    )
    auth.add_argument("--token-file", metavar="PATH", help="file holding the token")
    worker.add_argument(
        "--no-auth", action="store_true", help="accept clients without a token (trusted networks)"
    )
    worker.add_argument("--certfile", help="TLS certificate chain (PEM): serve wss://")
    worker.add_argument("--keyfile", help="TLS private key (PEM)")
    worker.add_argument(
        "--memory-quota",
        type=_quota,
        default=Limits.memory_quota,
        help="bytes one client may hold: every value it stores, what one operation may "
        "allocate (e.g. 2G; default a quarter of this machine's memory, here "
        f"{_format_size(Limits.memory_quota)}; 'none': no bound)",
    )
    worker.add_argument(
        "--max-message-size",
        type=_size,
        default=Limits.max_message,
        help="bytes per websocket message (larger frames are split; default 1M)",
    )
    worker.add_argument(
        "--max-frame-size",
        type=_size,
        default=Limits.max_frame,
        help="bytes per frame, tensors included (default 4G)",
    )
    worker.add_argument(
        "--max-pending",
        type=int,
        default=Limits.max_pending,
        help="commands one client may have waiting (default 100000)",
    )
    worker.add_argument(
        "--handshake-timeout",
        type=float,
        default=Limits.handshake_timeout,
        metavar="SECONDS",
        help="from a connection's accept to its accepted handshake, TLS included (default 10)",
    )
    worker.add_argument(
        "--max-unauthenticated",
        type=int,
        default=Limits.max_unauthenticated,
        metavar="N",
        help="connections at once that have not completed the handshake; more are closed "
        "at once (default 256)",
    )
    worker.add_argument(
        "--session-ttl",
        type=float,
        default=300.0,
        help="seconds a named session outlives its connection (default 300)",
    )
    worker.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="hold the data set in FILE (torch.save of {'data': ..., 'targets': ...}) as NAME",
    )
    worker.add_argument(
        "--dataset-tags",
        action="append",
        default=[],
        metavar="NAME=TAG[,TAG...]",
        help="tags a search finds data set NAME by, besides NAME and #NAME (bob.search)",
    )
    worker.add_argument(
        "--federation-key-env",
        default="FEDTENSOR_FEDERATION_KEY",
        metavar="NAME",
        help="environment variable holding the secret shared by the workers between which "
        "tensors move directly (ptr.move); without it, they cannot (default "
        "FEDTENSOR_FEDERATION_KEY)",
    )
    worker.add_argument(
        "--advertise-url",
        metavar="URL",
        help="the ws:// or wss:// URL other workers reach this one at, for moves "
        "(default: the address it listens on)",
    )
    worker.add_argument(
        "--capability-ttl",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long a capability to deliver a tensor here stays valid (default 60)",
    )
    worker.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch's intra-op threads (default: the cores divided between the compute "
        "threads); give each of several workers on one machine its share of the cores",
    )
    worker.add_argument(
        "--cpus",
        metavar="LIST",
        help="the CPUs this worker runs on, e.g. 0 or 0,2 or 4-7 (Linux: every thread's "
        "affinity; --threads defaults to their number): workers that share a machine "
        "each keep a core of their own (ft.local_workers(pin=True))",
    )
    worker.add_argument(
        "--batch-scheduling",
        action="store_true",
        help="Linux's SCHED_BATCH for every thread: a woken worker waits for the running "
        "thread's turn instead of preempting it, so a client on the same machine sends "
        "all its frames before a worker takes its core (ft.local_workers sets it)",
    )
    worker.add_argument(
        "--compute-threads",
        type=int,
        metavar="N",
        help="threads that run clients' commands, round robin by client, so that one "
        "client's long operation does not hold up another's (default: one per core, "
        "2 to 4)",
    )
    worker.add_argument(
        "--stop-on-stdin-eof",
        action="store_true",
        help="shut down when standard input closes: a parent holding the other end of a "
        "pipe (ft.local_workers) takes its workers with it even if it is killed",
    )
    worker.add_argument(
        "--step-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="FOR TESTS AND BENCHMARKS ONLY: sleep this long after every local training "
        "step, to simulate a slow worker (default 0)",
    )
    worker.add_argument(
        "--warm-up",
        action="store_true",
        help="before reporting ready, size and train one tiny local update, so that a "
        "client's first round does not pay the first run's costs (ft.local_workers sets it)",
    )
    worker.add_argument("--ping-interval", type=float, default=20.0, help="seconds (default 20)")
    worker.add_argument("--ping-timeout", type=float, default=20.0, help="seconds (default 20)")
    worker.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="default INFO",
    )
    return parser


def _token(args: argparse.Namespace) -> str | None:
    if args.no_auth:
        return None
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as file:
                token = file.read().strip()
        except OSError as exc:
            raise ConfigurationError(f"cannot read the token file: {exc}") from exc
        if not token:
            raise ConfigurationError(f"the token file {args.token_file} is empty")
        return token
    token = os.environ.get(args.token_env, "").strip()
    if not token:
        raise ConfigurationError(
            f"no token: set {args.token_env} or pass --token-file "
            "(or --no-auth, on a network you trust)"
        )
    return token


def _parse_cpus(spec: str) -> set[int]:
    """The CPUs of a ``--cpus`` list: numbers and ranges, comma-separated (``0,2,4-7``)."""
    cpus: set[int] = set()
    for part in spec.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            low = int(first)
            high = int(last) if dash else low
        except ValueError:
            raise ConfigurationError(
                f"--cpus takes CPU numbers and ranges such as 0,2,4-7, not {spec!r}"
            ) from None
        if low < 0 or high < low:
            raise ConfigurationError(f"--cpus: {part.strip()!r} is not a range of CPU numbers")
        cpus.update(range(low, high + 1))
    return cpus


def _pin_process(cpus: set[int]) -> None:
    """Run every thread of this process, and those it starts, on ``cpus`` only.

    Linux's affinity is per thread, and a thread starts with its creator's: the
    threads already running (torch's) are set one by one.
    """
    if not hasattr(os, "sched_setaffinity"):
        raise ConfigurationError("--cpus needs CPU affinity (os.sched_setaffinity: Linux)")
    allowed = os.sched_getaffinity(0)
    if not cpus <= allowed:
        raise ConfigurationError(
            f"--cpus: CPU {min(cpus - allowed)} is not among those this process may run on "
            f"({_ranges(allowed)})"
        )
    for thread in _threads():
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(thread, cpus)


def _batch_scheduling() -> None:
    """Every thread of this process, and those it starts, under ``SCHED_BATCH``.

    Not a lower priority: the same share of the CPU, but a thread that wakes does
    not preempt the one running (the kernel's fair class skips wake-up preemption
    for batch threads). On a machine where a client and its workers share the
    cores, the client's first send woke a worker on the client's own core, which
    took it over for a slice: the next worker's frame left ~4 ms late in one round
    of ten or more (simulated clients, 2 worker processes, 2 cores). Under batch
    scheduling the second send took 0.09 ms at the 90th percentile, not 4.1 ms.
    """
    if not hasattr(os, "sched_setscheduler") or not hasattr(os, "SCHED_BATCH"):
        raise ConfigurationError("--batch-scheduling needs Linux's SCHED_BATCH")
    for thread in _threads():
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setscheduler(thread, os.SCHED_BATCH, os.sched_param(0))


def _threads() -> list[int]:
    """This process's threads (0, this thread, without ``/proc``): a scheduling setting
    is per thread, and a new thread starts with its creator's."""
    try:
        return [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


def _ranges(cpus: set[int]) -> str:
    """``{0, 1, 2, 5}`` as ``0-2,5``."""
    parts: list[str] = []
    for cpu in sorted(cpus):
        if parts and cpu == int(parts[-1].rpartition("-")[2]) + 1:
            parts[-1] = f"{parts[-1].partition('-')[0]}-{cpu}"
        else:
            parts.append(str(cpu))
    return ",".join(parts)


def _datasets(specs: Sequence[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    datasets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigurationError(f"--dataset takes NAME=FILE, not {spec!r}")
        try:
            # weights_only: a data file is data; loading it must not run code.
            loaded = torch.load(path, weights_only=True)
        except Exception as exc:  # OSError, or whatever torch makes of a bad file
            raise ConfigurationError(
                f"cannot load the data set {name!r} from {path}: {exc}"
            ) from exc
        data = loaded.get("data") if isinstance(loaded, dict) else None
        targets = loaded.get("targets") if isinstance(loaded, dict) else None
        if not isinstance(data, torch.Tensor) or not isinstance(targets, torch.Tensor):
            raise ConfigurationError(
                f"{path} must hold a dict of tensors 'data' and 'targets' (from torch.save)"
            )
        if len(data) != len(targets):
            raise ConfigurationError(f"{path}: {len(data)} examples but {len(targets)} labels")
        datasets[name] = (data, targets)
    return datasets


def _dataset_tags(specs: Sequence[str], datasets: Mapping[str, object]) -> dict[str, list[str]]:
    tags: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, listed = spec.partition("=")
        if not sep or name not in datasets:
            raise ConfigurationError(
                f"--dataset-tags takes NAME=TAG,... for a --dataset NAME, not {spec!r}"
            )
        tags.setdefault(name, []).extend(tag.strip() for tag in listed.split(",") if tag.strip())
    return tags


def _ssl_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not args.certfile and not args.keyfile:
        return None
    if not args.certfile:
        raise ConfigurationError("--keyfile needs --certfile")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(args.certfile, args.keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"cannot load the TLS certificate or key: {exc}") from exc
    return context


#: Seconds a worker whose parent went away (--stop-on-stdin-eof) has to shut down
#: cleanly before it exits anyway: nobody is left to read what it would still answer.
ORPHAN_GRACE = 5.0


def _stop_when_stdin_closes(loop: asyncio.AbstractEventLoop, server: WorkerServer) -> None:
    """Block until standard input ends, then shut down (a thread of its own).

    The parent never writes; the pipe ends when the parent closes it or dies, however
    it dies (SIGKILL included: the kernel closes its files). A thread, not the event
    loop's reader, so that a busy or wedged loop cannot keep an orphan alive.
    """
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    with contextlib.suppress(RuntimeError):  # the loop already closed: we are exiting
        loop.call_soon_threadsafe(server.shutdown)
    threading.Event().wait(ORPHAN_GRACE)
    os._exit(1)


async def _run_worker(
    server: WorkerServer, host: str, port: int, stop_on_stdin_eof: bool = False
) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, server.shutdown)
    if stop_on_stdin_eof:
        threading.Thread(
            target=_stop_when_stdin_closes, args=(loop, server), name="stdin-watch", daemon=True
        ).start()
    async with anyio.create_task_group() as task_group:
        url = await task_group.start(server.serve, host, port)
        # Logged before the ready line: whoever waits for that line may read the log.
        logging.getLogger("fedtensor.server").info(
            "worker %s ready on %s (torch threads: %d)", server.id, url, torch.get_num_threads()
        )
        print(f"fedtensor worker {server.id} ready on {url}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["demo"]:
        from fedtensor.demo import main as demo

        return demo(arguments[1:])
    args = _parser().parse_args(arguments)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        token = _token(args)
        context = _ssl_context(args)
        limits = Limits(
            max_message=args.max_message_size,
            max_frame=args.max_frame_size,
            memory_quota=args.memory_quota,
            max_pending=args.max_pending,
            handshake_timeout=args.handshake_timeout,
            max_unauthenticated=args.max_unauthenticated,
        )
        datasets = _datasets(args.dataset)
        dataset_tags = _dataset_tags(args.dataset_tags, datasets)
        federation_key = os.environ.get(args.federation_key_env, "").strip().encode() or None
        if args.advertise_url is not None and not args.advertise_url.startswith(
            ("ws://", "wss://")
        ):
            raise ConfigurationError("--advertise-url must be a ws:// or wss:// URL")
        if not args.capability_ttl > 0:
            raise ConfigurationError("--capability-ttl must be more than 0")
        compute_threads = args.compute_threads or default_compute_threads()
        if compute_threads < 1:
            raise ConfigurationError("--compute-threads must be at least 1")
        if args.cpus is not None:
            cpus = _parse_cpus(args.cpus)
            _pin_process(cpus)
            if args.threads is None:
                args.threads = max(1, len(cpus) // compute_threads)
        if args.batch_scheduling:
            _batch_scheduling()
        if args.threads is not None:
            if args.threads < 1:
                raise ConfigurationError("--threads must be at least 1")
            torch.set_num_threads(args.threads)
        else:
            # Each compute thread's operations use torch's intra-op threads: N threads
            # of one per core each would oversubscribe the cores N times.
            torch.set_num_threads(max(1, torch.get_num_threads() // compute_threads))
        if not args.step_delay >= 0:
            raise ConfigurationError("--step-delay must be at least 0")
        if args.handshake_timeout <= 0 or args.max_unauthenticated < 1:
            raise ConfigurationError(
                "--handshake-timeout must be positive and --max-unauthenticated at least 1"
            )
        if args.max_message_size < 64:
            raise ConfigurationError("--max-message-size must be at least 64 bytes")
    except ConfigurationError as exc:
        print(f"fedtensor worker: {exc}", file=sys.stderr)
        return 2
    if token is None:
        logging.getLogger("fedtensor.server").warning("serving WITHOUT authentication (--no-auth)")
    server = WorkerServer(
        args.id,
        token=token,
        limits=limits,
        ssl=context,
        ping_interval=args.ping_interval or None,
        ping_timeout=args.ping_timeout or None,
        session_ttl=args.session_ttl,
        datasets=datasets,
        dataset_tags=dataset_tags,
        federation_key=federation_key,
        advertise_url=args.advertise_url,
        capability_ttl=args.capability_ttl,
        compute_threads=compute_threads,
    )
    server.actor.step_delay = args.step_delay
    if args.warm_up:
        from fedtensor.worker.local_updates import warm_up

        warming = time.perf_counter()
        warm_up()
        logging.getLogger("fedtensor.server").info(
            "warmed up in %.2f s", time.perf_counter() - warming
        )
    # What is alive now (torch's ~170,000 objects from its import) lives as long as the
    # process: the cycle collector need not walk it again in every full collection,
    # each of which holds every thread (a client storing many Python values triggers many).
    gc.collect()
    gc.freeze()
    try:
        asyncio.run(_run_worker(server, args.host, args.port, args.stop_on_stdin_eof))
    except* OSError as group:
        # Binding fails inside the task group, so the error arrives in a group.
        print(
            f"fedtensor worker: cannot listen on {args.host}:{args.port}: {group.exceptions[0]}",
            file=sys.stderr,
        )
        return_code = 2
    except* KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return_code = 130
    else:
        return_code = 0
    return return_code


if __name__ == "__main__":
    sys.exit(main())
