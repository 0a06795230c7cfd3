"""Hatchling build hook (pyproject.toml): the wheel installs jwtplus.py as a typed package.

PEP 561 has no py.typed for a single-file module, so the wheel ships jwtplus/__init__.py, a byte copy of
jwtplus.py, and an empty jwtplus/py.typed, while the repository keeps the one file for vendoring. An
editable install (``pip install -e .``) gets neither: its .pth file (dev-mode-dirs) imports ./jwtplus.py.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class TypedWheel(BuildHookInterface):
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if version == "editable":
            return
        self._marker_dir = tempfile.mkdtemp(prefix="jwtplus-py-typed-")
        marker = Path(self._marker_dir, "py.typed")
        marker.touch()
        build_data["force_include"][str(Path(self.root, "jwtplus.py"))] = "jwtplus/__init__.py"
        build_data["force_include"][str(marker)] = "jwtplus/py.typed"

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        if version != "editable":
            shutil.rmtree(self._marker_dir, ignore_errors=True)
