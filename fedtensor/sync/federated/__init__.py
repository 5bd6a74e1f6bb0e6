"""PySyft 0.2's ``syft.federated`` modules that its tutorials import, for ``fedtensor.sync``.

``from syft.federated.floptimizer import Optims`` becomes
``from fedtensor.sync.federated.floptimizer import Optims``.
"""
