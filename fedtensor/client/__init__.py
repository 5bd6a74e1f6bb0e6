"""The client layer: the engine dealing in ids and futures, pointers above it, worker handles.

It imports the protocol layer and the transport interface (:mod:`fedtensor.abc`), never
worker code: an in-process worker is reached through the ``memory://`` transport.
"""
