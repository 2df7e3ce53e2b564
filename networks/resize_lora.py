"""kohya's old path of tools/resize_lora.py, kept for existing wrapper scripts."""
import os, runpy  # noqa: E401

if __name__ == "__main__":
    runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "tools", "resize_lora.py"), run_name="__main__")
