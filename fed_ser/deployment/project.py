"""The project's Flower app metadata: the ``[tool.flwr.app]`` table of its ``pyproject.toml``.

One reader for the two places that need it: staging the app's files for ``flwr run``
(``fab-include``) and the fork server's preload (the ServerApp's and ClientApp's modules).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

#: the project folder (the one holding ``pyproject.toml``)
PROJECT = Path(__file__).resolve().parents[2]


def flwr_app(project: Path = PROJECT) -> dict:
    """The project's ``[tool.flwr.app]`` table of pyproject.toml (its components, its ``fab-include``)."""
    with open(Path(project) / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["flwr"]["app"]


def app_modules(project: Path = PROJECT) -> list[str]:
    """The modules of the project's ServerApp and ClientApp (``[tool.flwr.app.components]``)."""
    return [ref.partition(":")[0] for ref in flwr_app(project)["components"].values()]
