"""fedtensor's transports (installed as ``fedtensor.transports``).

- :mod:`fedtensor.transports.memory`: ``memory://ID``, workers in this process.
- :mod:`fedtensor.transports.websocket`: ``ws://HOST:PORT`` and ``wss://HOST:PORT``,
  ``fedtensor worker`` processes.
"""
