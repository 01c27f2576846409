"""`python -m shortft` (and `accelerate launch -m shortft train ...`)."""

import sys

from shortft.cli import main

sys.exit(main())
