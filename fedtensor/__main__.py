"""``python -m fedtensor worker ...``: see :mod:`fedtensor.cli`."""

import sys

from fedtensor.cli import main

sys.exit(main())
