"""`batchd --help` stays fast: the CLI imports each command's stack only when it runs."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("cv2", "fastapi", "uvicorn", "starlette", "torch", "keras")

_PROBE = """
import json, sys
from click.testing import CliRunner
from batchd_server.cli import cli
result = CliRunner().invoke(cli, {args!r})
print(json.dumps({{"code": result.exit_code, "out": result.output, "mods": sorted(sys.modules)}}))
"""


def _help(*args: str) -> dict[str, object]:
    code = _PROBE.format(args=[*args, "--help"])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    got: dict[str, object] = json.loads(out.stdout.splitlines()[-1])
    return got


def test_help_imports_no_opencv_and_no_web_stack() -> None:
    got = _help()
    assert got["code"] == 0 and "pack" in str(got["out"]) and "serve" in str(got["out"])
    mods = got["mods"]
    assert isinstance(mods, list)
    heavy = sorted(m for m in mods if m.split(".")[0] in HEAVY)
    assert heavy == [], f"batchd --help imported {heavy}"


def test_subcommand_help_is_light_too() -> None:
    for command in ("demo", "pack", "serve", "verify"):
        got = _help(command)
        assert got["code"] == 0, got["out"]
        mods = got["mods"]
        assert isinstance(mods, list)
        heavy = sorted(m for m in mods if m.split(".")[0] in HEAVY)
        assert heavy == [], f"batchd {command} --help imported {heavy}"
