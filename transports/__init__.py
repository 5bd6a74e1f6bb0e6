"""fedtensor's transports (installed as ``fedtensor.transports``).

- :mod:`fedtensor.transports.memory`: ``memory://ID``, workers in this process.
"""
