"""`import batchd` stays thin: no framework or server dependency is imported."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "keras", "fastapi", "uvicorn", "cv2", "starlette", "tensorflow", "jax")


def test_import_batchd_is_light() -> None:
    code = "import sys, json, batchd; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY)
    assert heavy == [], f"import batchd pulled in {heavy}"
    assert {"numpy", "msgpack"} <= {m.split(".")[0] for m in loaded}


ADAPTER = """
import os, sys
for name in {blocked!r}:
    sys.modules[name] = None  # as if not installed: import raises ModuleNotFoundError
os.environ.pop("KERAS_BACKEND", None)
os.environ.update({env!r})
import batchd
client = batchd.Client("http://127.0.0.1:9", "toy")  # nothing is sent before the import
try:
    client.{adapter}
except ImportError as exc:
    print(exc)
"""


@pytest.mark.parametrize(
    ("adapter", "blocked", "env", "says"),
    [
        ("torch()", ["torch"], {}, "needs PyTorch, which is not installed"),
        ("keras('image')", ["keras"], {}, "pip install 'batchd[keras]'"),
        ("keras('image')", ["tensorflow"], {}, "KERAS_BACKEND is unset, so Keras wants tensorflow"),
        (
            "keras('image')",
            ["jax"],
            {"KERAS_BACKEND": "jax"},
            "jax is not installed; KERAS_BACKEND=jax",
        ),
    ],
)
def test_a_missing_framework_says_what_to_install(
    adapter: str, blocked: list[str], env: dict[str, str], says: str
) -> None:
    code = ADAPTER.format(blocked=blocked, env=env, adapter=adapter)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert says in out.stdout, out.stdout
