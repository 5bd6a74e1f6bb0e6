"""PySyft 0.2.9 tutorial Part 5, "Welcome to the Sandbox", on fedtensor.

The notebook's code cells in order, with only ``import syft as sy`` changed to
``import fedtensor.sync as sy``; a bare expression a notebook cell would display is
printed. The data sets PySyft's sandbox downloads from scikit-learn are replaced by
small seeded tensors of the same shapes and tags (fedtensor.sync.sandbox); nothing is
downloaded.
"""

import torch

import fedtensor.sync as sy

sy.create_sandbox(globals())

print(workers)
print(hook)
print(bob)
print("bob holds", len(bob._objects), "objects")

x = (
    torch.tensor([1, 2, 3, 4, 5])
    .tag("#radio", "#hospital1")
    .describe("The input datapoints to the hospital1 dataset.")
)
y = (
    torch.tensor([5, 4, 3, 2, 1])
    .tag("#radio", "#hospital2")
    .describe("The input datapoints to the hospital2 dataset.")
)
z = (
    torch.tensor([1, 2, 3, 4, 5])
    .tag(
        "#fun",
        "#mnist",
    )
    .describe("The images in the MNIST training dataset.")
)

print(x)

x = x.send(bob)
y = y.send(bob)
z = z.send(bob)

# this searches for exact match within a tag or within the description
results = bob.search(["#radio"])

print(results)
print(results[0].description)

boston_housing_results = bob.search(["#boston", "#housing"])

print(boston_housing_results)

grid = sy.PrivateGridNetwork(*workers)

results = grid.search("#boston")
print({worker: len(found) for worker, found in results.items()})

boston_data = grid.search("#boston", "#data")
print({worker: tuple(found[0].shape) for worker, found in boston_data.items()})

boston_target = grid.search("#boston", "#target")
print({worker: tuple(found[0].shape) for worker, found in boston_target.items()})
