"""The ``batchd`` console script: the CLI, or one line saying to install the server extra.

This module imports nothing but the standard library, so it runs on a client-only
install (``pip install batchd``), where the commands' dependencies are missing.
"""

from __future__ import annotations

import sys

__all__ = ["main"]

#: Modules the server extra provides (pyproject.toml), as ``import`` names.
SERVER_EXTRA = frozenset(
    {"click", "cv2", "fastapi", "prometheus_client", "starlette", "tqdm", "uvicorn", "xxhash"}
)


def main(argv: list[str] | None = None) -> None:
    try:
        from .cli import main as cli_main

        cli_main(argv)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in SERVER_EXTRA:
            raise
        print(
            f"batchd: the server commands need the server extra (no module {exc.name!r}): "
            "pip install 'batchd[server]'",
            file=sys.stderr,
        )
        sys.exit(1)
