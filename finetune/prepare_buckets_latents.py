"""kohya's path of tools/prepare_buckets_latents.py (sd-scripts keeps it in finetune/)."""
import os, runpy  # noqa: E401

if __name__ == "__main__":
    tool = os.path.join(os.path.dirname(__file__), "..", "tools", "prepare_buckets_latents.py")
    runpy.run_path(tool, run_name="__main__")
