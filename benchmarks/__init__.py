"""fedtensor benchmarks: ``python -m benchmarks`` (see :mod:`benchmarks.run`)."""

import warnings

# torch warns at import when numpy is absent; numpy is not a dependency. Here, the package
# being imported first by every suite, the filter precedes every import of torch.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
