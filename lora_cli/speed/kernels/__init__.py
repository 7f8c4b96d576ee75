"""Triton kernels, one file per operation, with their launchers. They import nothing of lora_cli above them.

triton is imported inside the launchers (or by the importing module, lazily): CPU installs may lack it.
"""

import functools


@functools.cache
def triton_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None
