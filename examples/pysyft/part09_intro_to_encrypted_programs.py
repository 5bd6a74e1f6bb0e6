"""PySyft 0.2.9 tutorial Part 9, "Intro to Encrypted Programs", on fedtensor.

The notebook's code cells in order, with only ``import syft as sy`` changed to
``import fedtensor.sync as sy``; a bare expression a notebook cell would display is
printed (with a label where the notebook's output alone would be ambiguous). Nothing
is downloaded in this part and there is no training loop to shorten. Steps 1 and 2
are plain Python; step 3 secret-shares over virtual workers (fedtensor.client.sharing):
shares uniform over the integers modulo 2^64, Beaver triples from the crypto provider
for ``*`` and ``mm``, comparisons and ``max`` by a binary adder with its help.
"""

# Step 1: Encryption Using Secure Multi-Party Computation

Q = 1234567891011

x = 25

import random


def encrypt(x):
    share_a = random.randint(-Q, Q)
    share_b = random.randint(-Q, Q)
    share_c = (x - share_a - share_b) % Q
    return (share_a, share_b, share_c)


print(encrypt(x))


def decrypt(*shares):
    return sum(shares) % Q


a, b, c = encrypt(25)

print("decrypt(a, b, c):", decrypt(a, b, c))

print("decrypt(a, b):", decrypt(a, b))

# Step 2: Basic Arithmetic Using SMPC

x = encrypt(25)
y = encrypt(5)


def add(x, y):
    z = list()
    # the first worker adds their shares together
    z.append((x[0] + y[0]) % Q)

    # the second worker adds their shares together
    z.append((x[1] + y[1]) % Q)

    # the third worker adds their shares together
    z.append((x[2] + y[2]) % Q)

    return z


print("decrypt(*add(x,y)):", decrypt(*add(x, y)))

# Step 3: SMPC Using PySyft

import torch

import fedtensor.sync as sy

hook = sy.TorchHook(torch)

bob = sy.VirtualWorker(hook, id="bob")
alice = sy.VirtualWorker(hook, id="alice")
bill = sy.VirtualWorker(hook, id="bill")

# Basic Encryption/Decryption

x = torch.tensor([25])

print(x)

encrypted_x = x.share(bob, alice, bill)

print("encrypted_x.get():", encrypted_x.get())

# Introspecting the Encrypted Values

print("bob._objects:", bob._objects)

x = torch.tensor([25]).share(bob, alice, bill)

# Bob's share
bobs_share = list(bob._objects.values())[0]
print("Bob's share:", bobs_share)

# Alice's share
alices_share = list(alice._objects.values())[0]
print("Alice's share:", alices_share)

# Bill's share
bills_share = list(bill._objects.values())[0]
print("Bill's share:", bills_share)

print("sum of the shares:", (bobs_share + alices_share + bills_share))

# Encrypted Arithmetic

x = torch.tensor([25]).share(bob, alice)
y = torch.tensor([5]).share(bob, alice)

z = x + y
print("x + y:", z.get())

z = x - y
print("x - y:", z.get())

# Encrypted Multiplication

crypto_provider = sy.VirtualWorker(hook, id="crypto_provider")

x = torch.tensor([25]).share(bob, alice, crypto_provider=crypto_provider)
y = torch.tensor([5]).share(bob, alice, crypto_provider=crypto_provider)

# multiplication

z = x * y
print("x * y:", z.get())

x = torch.tensor([[1, 2], [3, 4]]).share(bob, alice, crypto_provider=crypto_provider)
y = torch.tensor([[2, 0], [0, 2]]).share(bob, alice, crypto_provider=crypto_provider)

# matrix multiplication

z = x.mm(y)
print("x.mm(y):", z.get())

# Encrypted comparison

x = torch.tensor([25]).share(bob, alice, crypto_provider=crypto_provider)
y = torch.tensor([5]).share(bob, alice, crypto_provider=crypto_provider)

z = x > y
print("x > y:", z.get())

z = x <= y
print("x <= y:", z.get())

z = x == y
print("x == y:", z.get())

z = x == y + 20
print("x == y + 20:", z.get())

x = torch.tensor([2, 3, 4, 1]).share(bob, alice, crypto_provider=crypto_provider)
print("x.max():", x.max().get())

x = torch.tensor([[2, 3], [4, 1]]).share(bob, alice, crypto_provider=crypto_provider)
max_values, max_ids = x.max(dim=0)
print("max_values:", max_values.get())
