"""``python -m fedtensor worker ...``: see :mod:`fedtensor._cli`."""

import sys

from ._cli import main

sys.exit(main())
