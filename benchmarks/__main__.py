"""``python -m benchmarks`` (``./dev bench``): the in-memory suite (benchmarks/memory.py), or
with ``--network`` or ``--federated`` that suite (``--federated``: then asynchronous.py,
secagg.py, scale.py and simulation.py too), ``--scale`` only scale.py;
``--profile ROW``: an in-memory row's cProfile.
Each suite imports only ``benchmarks.common``."""

import argparse
import importlib
import sys
from pathlib import Path

from benchmarks import common, memory

parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
parser.add_argument("--quick", action="store_true", help="a smoke run: fewer repetitions")
parser.add_argument("--uvloop", action="store_true", help="on uvloop, if it is installed")
parser.add_argument("--json", type=Path, default=common.REPO / "benchmarks/results/latest.json")
suites = parser.add_mutually_exclusive_group()
suites.add_argument("--network", action="store_true", help="worker processes over websockets")
suites.add_argument("--federated", action="store_true", help="ft.fit vs plain torch training")
suites.add_argument(
    "--scale", action="store_true", help="1, 2, 4 local worker processes; Ray's transports"
)
suites.add_argument("--profile", choices=("roundtrip", "chain", "bulk", "fanout"))
parser.add_argument("--encode", action="store_true", help="--profile on encoding workers")
parser.add_argument("--top", type=int, default=15, help="--profile: how many entries")
parser.add_argument("--compare-codec", type=Path, help="an older protocol/codec.py, timed too")
args = parser.parse_args()
if args.profile:
    print(memory.profile_row(args.profile, args.encode, args.uvloop, args.top))
elif args.network or args.federated:
    suite = importlib.import_module("benchmarks." + ("network" if args.network else "federated"))
    status = suite.run_from_args(args)
    if args.federated:  # then FedBuff against FedAvg with slow workers (benchmarks/asynchronous.py)
        status = importlib.import_module("benchmarks.asynchronous").run_from_args(args) or status
    if args.federated:  # then SecAgg+ against the plain round (benchmarks/secagg.py)
        status = importlib.import_module("benchmarks.secagg").run_from_args(args) or status
    if args.federated:  # then every core and Ray (benchmarks/scale.py)
        status = importlib.import_module("benchmarks.scale").run_from_args(args) or status
    if args.federated:  # then 1,000 and 10,000 simulated clients (benchmarks/simulation.py)
        status = importlib.import_module("benchmarks.simulation").run_from_args(args) or status
    sys.exit(status)
elif args.scale:
    sys.exit(importlib.import_module("benchmarks.scale").run_from_args(args))
else:
    sys.exit(memory.run_from_args(args))
