"""``python -m pyllama_ernie``."""

import sys

from .cli import main

sys.exit(main())
