"""PySyft 0.2.9 tutorial Part 3, "Advanced Remote Execution Tools", on fedtensor.

The notebook's code cells in order, with only ``import syft as sy`` changed to
``import fedtensor.sync as sy``; a bare expression a notebook cell would display is
printed. Nothing is downloaded in this part.
"""

import torch

import fedtensor.sync as sy

hook = sy.TorchHook(torch)

bob = sy.VirtualWorker(hook, id="bob")
alice = sy.VirtualWorker(hook, id="alice")

# this is a local tensor
x = torch.tensor([1, 2, 3, 4])
print(x)

# this sends the local tensor to Bob
x_ptr = x.send(bob)

# this is now a pointer
print(x_ptr)

# now we can SEND THE POINTER to alice!!!
pointer_to_x_ptr = x_ptr.send(alice)

print(pointer_to_x_ptr)

# As you can see above, Bob still has the actual data (data is always stored in a LocalTensor type).
print("bob:", bob._objects)

# Alice, on the other hand, has x_ptr!! (notice how it points at bob)
print("alice:", alice._objects)

# and we can use .get() to get x_ptr back from Alice

x_ptr = pointer_to_x_ptr.get()
print(x_ptr)

# and then we can use x_ptr to get x back from Bob!

x = x_ptr.get()
print("x:", x)

print("bob:", bob._objects)
print("alice:", alice._objects)

p2p2x = torch.tensor([1, 2, 3, 4, 5]).send(bob).send(alice)

y = p2p2x + p2p2x

print("bob:", bob._objects)
print("alice:", alice._objects)

print("y:", y.get().get())

print("bob:", bob._objects)
print("alice:", alice._objects)

print("p2p2x:", p2p2x.get().get())

print("bob:", bob._objects)
print("alice:", alice._objects)

# x is now a pointer to the data which lives on Bob's machine
x = torch.tensor([1, 2, 3, 4, 5]).send(bob)

print("  bob:", bob._objects)
print("alice:", alice._objects)

x = x.move(alice)

print("  bob:", bob._objects)
print("alice:", alice._objects)

print(x)
