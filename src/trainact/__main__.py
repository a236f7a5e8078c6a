"""``python -m trainact``: the experiments command (needs the ``[experiments]`` extra)."""

import sys

from trainact.experiments.cli import main

sys.exit(main())
