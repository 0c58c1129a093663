"""The app's files as ``flwr run`` gets them: a staged copy of what its FAB is built from.

``flwr run`` walks every file under the folder it is given before it filters them, and the project
folder holds the virtual environment (~80,000 files, 11 s a run on 2 cores); a copy of the
``fab-include`` files and ``pyproject.toml`` builds the same FAB. Each staging goes to a fresh
temporary folder of its own: nothing that was there before is removed or overwritten.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from fed_ser.deployment.project import PROJECT, flwr_app


def stage_app(parent: str | Path, project: Path = PROJECT) -> Path:
    """Copy the files the app's FAB is built from (``fab-include``, and pyproject.toml) into a new folder
    under ``parent`` (created 0700 by :func:`tempfile.mkdtemp`); return it. The caller removes it."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="app-", dir=parent))
    try:
        for pattern in flwr_app(project)["fab-include"]:
            for src in project.glob(pattern):
                if src.is_file() and "__pycache__" not in src.parts:
                    dst = folder / src.relative_to(project)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, dst)
        shutil.copy2(project / "pyproject.toml", folder / "pyproject.toml")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder
