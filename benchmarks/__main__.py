"""``python -m benchmarks KIND ...`` from a montrage checkout (``montrage bench KIND ...`` runs this)."""
import sys

from benchmarks.cli import main

sys.exit(main())
