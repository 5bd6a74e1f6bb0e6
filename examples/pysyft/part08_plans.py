"""PySyft 0.2.9 tutorial Part 8, "Introduction to Plans", on fedtensor.

The notebook's code cells in order, with only ``import syft as sy`` changed to
``import fedtensor.sync as sy``; a bare expression a notebook cell would display is
printed. Nothing is downloaded in this part.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import fedtensor.sync as sy  # import the Pysyft library

hook = sy.TorchHook(torch)  # hook PyTorch ie add extra functionalities

# IMPORTANT: Local worker should not be a client worker
hook.local_worker.is_client_worker = False


server = hook.local_worker

x11 = torch.tensor([-1, 2.0]).tag("input_data")
x12 = torch.tensor([1, -2.0]).tag("input_data2")
x21 = torch.tensor([-1, 2.0]).tag("input_data")
x22 = torch.tensor([1, -2.0]).tag("input_data2")

device_1 = sy.VirtualWorker(hook, id="device_1", data=(x11, x12))
device_2 = sy.VirtualWorker(hook, id="device_2", data=(x21, x22))
devices = device_1, device_2


@sy.func2plan()
def plan_double_abs(x):
    x = x + x
    x = torch.abs(x)
    return x


print(plan_double_abs)

pointer_to_data = device_1.search("input_data")[0]
print(pointer_to_data)

print("is_built:", plan_double_abs.is_built)

# Sending non-built Plan will fail
try:
    plan_double_abs.send(device_1)
except RuntimeError as error:
    print(error)

plan_double_abs.build(torch.tensor([1.0, -2.0]))

print("is_built:", plan_double_abs.is_built)

# This cell is executed successfully
pointer_plan = plan_double_abs.send(device_1)
print(pointer_plan)

pointer_to_result = pointer_plan(pointer_to_data)
print(pointer_to_result)

print("double abs:", pointer_to_result.get())


class Net(sy.Plan):
    def __init__(self):
        super(Net, self).__init__()
        self.fc1 = nn.Linear(2, 3)
        self.fc2 = nn.Linear(3, 2)

    def forward(self, x):
        x = F.relu(self.fc1(x))
        x = self.fc2(x)
        return F.log_softmax(x, dim=0)


net = Net()

print(net)

net.build(torch.tensor([1.0, 2.0]))

pointer_to_net = net.send(device_1)
print(pointer_to_net)

pointer_to_data = device_1.search("input_data")[0]

pointer_to_result = pointer_to_net(pointer_to_data)
print(pointer_to_result)

print("net on device_1:", pointer_to_result.get())


class Net(sy.Plan):
    def __init__(self):
        super(Net, self).__init__()
        self.fc1 = nn.Linear(2, 3)
        self.fc2 = nn.Linear(3, 2)

    def forward(self, x):
        x = F.relu(self.fc1(x))
        x = self.fc2(x)
        return F.log_softmax(x, dim=0)


net = Net()

# Build plan
net.build(torch.tensor([1.0, 2.0]))

pointer_to_net_1 = net.send(device_1)
pointer_to_data = device_1.search("input_data")[0]
pointer_to_result = pointer_to_net_1(pointer_to_data)
print("net on device_1:", pointer_to_result.get())

pointer_to_net_2 = net.send(device_2)
pointer_to_data = device_2.search("input_data")[0]
pointer_to_result = pointer_to_net_2(pointer_to_data)
print("net on device_2:", pointer_to_result.get())

# (Not in the notebook: the same net run here, to compare with the workers' results.)
print("net locally:", net(x11))


@sy.func2plan(args_shape=[(-1, 1)])
def plan_double_abs(x):
    x = x + x
    x = torch.abs(x)
    return x


print("is_built:", plan_double_abs.is_built)


@sy.func2plan(args_shape=[(1, 2), (-1, 2)])
def plan_sum_abs(x, y):
    s = x + y
    return torch.abs(s)


print("is_built:", plan_sum_abs.is_built)


@sy.func2plan(args_shape=[(1,)], state=(torch.tensor([1]),))
def plan_abs(x, state):
    (bias,) = state.read()
    x = x.abs()
    return x + bias


pointer_plan = plan_abs.send(device_1)
x_ptr = torch.tensor([-1, 0]).send(device_1)
p = pointer_plan(x_ptr)
print("abs plus state:", p.get())
