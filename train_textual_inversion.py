"""kohya's `train_textual_inversion.py`: not built yet (a later issue); it answers so instead of failing obscurely."""

import sys

from library.errors import UserError, run_cli


def _not_yet(argv):
    raise UserError("train_textual_inversion.py is not implemented yet: sdtune trains networks with train_network.py for now")


def main(argv=None) -> int:
    return run_cli(_not_yet, argv)


if __name__ == "__main__":
    sys.exit(main())
