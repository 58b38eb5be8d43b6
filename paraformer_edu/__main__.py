"""`python -m paraformer_edu`: the command line (see paraformer_edu.cli)."""

import sys

from paraformer_edu.cli import main

if __name__ == "__main__":
    sys.exit(main())
