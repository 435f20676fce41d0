"""On a client-only install (no server extra) the `batchd` command says what to install."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Refuses the server extra's modules, as a `pip install batchd` without [server] would.
_BLOCKED = """
import sys, importlib.abc
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, Missing())
sys.argv = ["batchd", *{args!r}]
from batchd_server.entry import main
main()
"""


@pytest.mark.parametrize("blocked", [["xxhash"], ["click"], ["fastapi", "uvicorn"]])
@pytest.mark.parametrize("args", [["--help"], ["serve", "--data", "/nonexistent-dir"]])
def test_a_missing_server_extra_is_one_line_naming_the_extra(
    blocked: list[str], args: list[str]
) -> None:
    code = _BLOCKED.format(blocked=set(blocked), args=args)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode == 0:
        # --help needs none of fastapi/uvicorn: it must simply work.
        assert blocked == ["fastapi", "uvicorn"] and args == ["--help"], done.stderr
        assert "Usage: batchd" in done.stdout
        return
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode in (1, 2), done.stderr
    if done.returncode == 1:
        assert "pip install 'batchd[server]'" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
