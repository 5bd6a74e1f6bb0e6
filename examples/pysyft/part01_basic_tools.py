"""PySyft 0.2.9 tutorial Part 1, "The Basic Tools of Private Deep Learning", on fedtensor.

The notebook's code cells in order, with only ``import syft as sy`` changed to
``import fedtensor.sync as sy``; a bare expression a notebook cell would display is
printed. Nothing is downloaded in this part. Run: ``python examples/pysyft/part01_basic_tools.py``.
"""

# Run this cell to see if things work
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn import Parameter

import fedtensor.sync as sy

hook = sy.TorchHook(torch)

print(torch.tensor([1, 2, 3, 4, 5]))

x = torch.tensor([1, 2, 3, 4, 5])
y = x + x
print(y)

bob = sy.VirtualWorker(hook, id="bob")

x = torch.tensor([1, 2, 3, 4, 5])
y = torch.tensor([1, 1, 1, 1, 1])

x_ptr = x.send(bob)
y_ptr = y.send(bob)

print(x_ptr)
print(bob._objects)

z = x_ptr + x_ptr
print(z)
print(bob._objects)

print(x_ptr)
print(x_ptr.location)
print(bob)
print("location is bob:", bob == x_ptr.location)
print(x_ptr.id_at_location)
print(x_ptr.owner)

me = sy.local_worker
print(me)
print("owner is me:", me == x_ptr.owner)

print(x_ptr)
print("x:", x_ptr.get())
print(y_ptr)
print("y:", y_ptr.get())
print("z:", z.get())
print("objects after get:", len(bob._objects))

x = torch.tensor([1, 2, 3, 4, 5]).send(bob)
y = torch.tensor([1, 1, 1, 1, 1]).send(bob)

z = x + y
print(z)
print("x + y:", z.get())
print(x)
print(y)

z = torch.add(x, y)
print(z)
print("torch.add:", z.get())

x = torch.tensor([1, 2, 3, 4, 5.0], requires_grad=True).send(bob)
y = torch.tensor([1, 1, 1, 1, 1.0], requires_grad=True).send(bob)

z = (x + y).sum()
z.backward()

x = x.get()
print(x)
print("grad:", x.grad)
