"""kohya's path of tools/merge_captions_to_metadata.py (sd-scripts keeps it in finetune/)."""
import os, runpy  # noqa: E401

if __name__ == "__main__":
    tool = os.path.join(os.path.dirname(__file__), "..", "tools", "merge_captions_to_metadata.py")
    runpy.run_path(tool, run_name="__main__")
