"""The seed notebook (PySyft 0.2, "Basic Remote Execution"), cell by cell, on fedtensor.

Only the import line differs from the original: ``import fedtensor.sync as sy``
instead of ``import syft as sy``. Run it with ``python examples/seed_notebook.py``.
"""

import torch as th

import fedtensor.sync as sy


def main() -> None:
    hook = sy.TorchHook(th)
    bob = sy.VirtualWorker(hook, id="bob")
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
    bob = sy.VirtualWorker(hook, id="bob")
    alice = sy.VirtualWorker(hook, id="alice")
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
