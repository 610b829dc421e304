"""`python -m fastlstm ...`: the same command as the `fastlstm` console script."""
import sys

from .cli import main

sys.exit(main())
