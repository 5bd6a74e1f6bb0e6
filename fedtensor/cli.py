"""The ``fedtensor`` command: ``fedtensor worker`` runs a worker process.

    fedtensor worker --id bob --host 127.0.0.1 --port 8765
    fedtensor demo                   # federated training on digits (see fedtensor.demo)

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
status 2 and a one-line reason when its configuration is bad.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import ssl
import sys
from collections.abc import Sequence

import anyio
import torch

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
        "--memory-quota", type=_size, help="bytes of tensors one client may store (e.g. 2G)"
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
        "--threads",
        type=int,
        metavar="N",
        help="torch's intra-op threads (default: torch's, one per core); give each of "
        "several workers on one machine its share of the cores",
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


async def _run_worker(server: WorkerServer, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, server.shutdown)
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
        )
        datasets = _datasets(args.dataset)
        if args.threads is not None:
            if args.threads < 1:
                raise ConfigurationError("--threads must be at least 1")
            torch.set_num_threads(args.threads)
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
    )
    try:
        asyncio.run(_run_worker(server, args.host, args.port))
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
