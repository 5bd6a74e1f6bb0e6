"""The network layer: the websocket connection driven by asyncio, for worker and client.

It drives :mod:`fedtensor.protocol`'s sans-I/O framing over an asyncio transport and knows
nothing of workers or clients: the worker's server and the client's websocket transport
both sit on it.
"""
