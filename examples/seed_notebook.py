"""The seed notebook (PySyft 0.2, "Basic Remote Execution"), cell by cell, on fedtensor.

Only the import line differs from the original: ``import fedtensor.sync as sy``
instead of ``import syft as sy``. Run it with ``python examples/seed_notebook.py``
(virtual workers in this process), or against two worker processes::

    export FEDTENSOR_TOKEN=$(python -c "import secrets; print(secrets.token_urlsafe())")
    fedtensor worker --id bob --port 8765 &
    fedtensor worker --id alice --port 8766 &
    python examples/seed_notebook.py --workers ws://127.0.0.1:8765 ws://127.0.0.1:8766
"""

import argparse
import os

import torch as th

import fedtensor.sync as sy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workers",
        nargs=2,
        metavar="URL",
        help="bob's and alice's worker URLs (token from FEDTENSOR_TOKEN)",
    )
    args = parser.parse_args()
    hook = sy.TorchHook(th)
    if args.workers:
        token = os.environ.get("FEDTENSOR_TOKEN")
        remote_bob = sy.connect(args.workers[0], token=token)
        remote_alice = sy.connect(args.workers[1], token=token)

    def VirtualWorker(hook: sy.TorchHook, id: str) -> object:  # the seed's name
        if args.workers:
            return remote_bob if id == "bob" else remote_alice
        return sy.VirtualWorker(hook, id=id)

    bob = VirtualWorker(hook, id="bob")
    print("bob._objects", bob._objects)

    x = th.tensor([1, 2, 3, 4, 5])
    x = x.send(bob)
    print("bob._objects", bob._objects)
    print("x.location", x.location)
    print("x.id_at_location", x.id_at_location)
    print("x.id", x.id)
    print("x.owner", x.owner)
    print("hook.local_worker", hook.local_worker)
    print("x.get()", x.get())
    print("bob._objects", bob._objects)

    # Playing with remote tensors: two workers at once.
    bob = VirtualWorker(hook, id="bob")
    alice = VirtualWorker(hook, id="alice")
    x = th.tensor([1, 2, 3, 4, 5])
    x = x.send(bob, alice)
    print(x)
    print("bob._objects", bob._objects)
    print("alice._objects", alice._objects)
    print("x.get()", x.get())
    print("bob._objects", bob._objects, "alice._objects", alice._objects)
    x = th.tensor([1, 2, 3, 4, 5]).send(bob, alice)
    z = x.get(sum_results=True)
    print("sum_results", z)

    # Remote arithmetic.
    x = th.tensor([1, 2, 3, 4, 5]).send(bob)
    y = th.tensor([1, 1, 1, 1, 1]).send(bob)
    print(x, y)
    z = x + y
    print(z)
    z = z.get()
    print("x + y", z)
    z = th.add(x, y)
    print(z)
    z = z.get()
    print("th.add(x, y)", z)

    # Remote autograd.
    x = th.tensor([1.0, 2, 3, 4, 5], requires_grad=True).send(bob)
    y = th.tensor([1.0, 1, 1, 1, 1], requires_grad=True).send(bob)
    z = (x + y).sum()
    print(z.backward())
    x = x.get()
    print("x", x)
    print("x.grad", x.grad)


if __name__ == "__main__":
    main()
