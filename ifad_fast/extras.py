"""Optional dependencies: which extra of `pip install "ifad-fast[EXTRA]"` brings each one.

The engine (load, restore, evaluate) needs none of them; `synth`, `demo` and `bench` need
nilearn's MNI152 maps, figures need matplotlib, `--register` needs SimpleITK (register.py names
its extra itself).
"""
from __future__ import annotations

import importlib.util

from .errors import IfadError

EXTRAS = {"nilearn": "data", "matplotlib": "figures"}


def require(module: str):
    """The import spec of the optional dependency `module`, or IfadError naming the extra to install."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise IfadError(f'this needs {module}: pip install "ifad-fast[{EXTRAS[module]}]"')
    return spec
