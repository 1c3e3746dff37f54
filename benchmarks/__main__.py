"""``python -m benchmarks``: every benchmark at one size (see :mod:`benchmarks.suite`)."""

import sys

from benchmarks.suite import main

sys.exit(main())
