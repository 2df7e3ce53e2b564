"""kohya's `sdxl_train.py`, kept for existing command lines and GUI wrappers: sdtune's fine_tune.py trains
every family (SD 1.x, 2.x, SDXL: the model's weights say which), so this name runs it, with its options."""

import sys

from fine_tune import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
