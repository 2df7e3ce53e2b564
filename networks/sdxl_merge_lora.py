"""kohya's networks/sdxl_merge_lora.py: tools/merge_lora.py with --sdxl (the model family is checked)."""
import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from tools.merge_lora import main

    sys.exit(main(["--sdxl", *sys.argv[1:]]))
