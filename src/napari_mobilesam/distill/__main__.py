"""``python -m napari_mobilesam.distill`` (what ``torchrun -m`` needs): the CLI."""

import sys

from .cli import main

sys.exit(main())
