"""Script entry for people who prefer a path: `torchrun ... launch/train.py train --config C`
is the same as `torchrun ... -m decoupled train --config C`."""
import sys

from decoupled.cli import main

if __name__ == "__main__":
    sys.exit(main())
