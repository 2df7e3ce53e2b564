"""kohya's `sdxl_train_textual_inversion.py`, kept for existing command lines and GUI wrappers: sdtune's train_textual_inversion.py trains
every family (SD 1.x, 2.x, SDXL: the model's weights say which), so this name runs it, with its options."""

import sys

from train_textual_inversion import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
