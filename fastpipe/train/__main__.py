"""`python -m fastpipe.train`: see fastpipe.train.cli."""
import sys

from fastpipe.train.cli import main

sys.exit(main())
