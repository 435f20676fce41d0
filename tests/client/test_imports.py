"""`import batchd` stays thin: no framework or server dependency is imported."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "keras", "fastapi", "uvicorn", "cv2", "starlette", "tensorflow", "jax")


def test_import_batchd_is_light() -> None:
    code = "import sys, json, batchd; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY)
    assert heavy == [], f"import batchd pulled in {heavy}"
    assert {"numpy", "msgpack"} <= {m.split(".")[0] for m in loaded}
