"""sdtune's side of `--network_module lycoris.kohya` (the lycoris-lora package).

`adapt(module)` returns the module the trainer and tools use in place of `lycoris.kohya`: the package's
own functions, with the known defects of lycoris-lora seen with diffusers models and transformers 5
handled here (see the README's network table and FACTS.md).
"""

from __future__ import annotations

from types import ModuleType


def adapt(module: ModuleType) -> ModuleType:
    """The plug-in module to use for `lycoris.kohya` (today: the module itself)."""
    return module
