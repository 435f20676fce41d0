"""Schemathesis over the server's own /openapi.json: no 5xx, every answer as declared.

Every operation gets generated valid and invalid requests (bounded by
``BATCHD_FUZZ_EXAMPLES`` per operation, derandomized so CI runs are repeatable).
Half of the dataset names are replaced by the served pack's, so batch requests reach
the engine rather than stopping at 404. Responses are checked for server errors,
documented status codes, content types, headers and body schemas; a msgpack
deserializer lets schemathesis read batch bodies (decoded with the client's strict
wire decoder, so a malformed body fails the run too).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
import xxhash
from _common import Figures, env_int
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.core.deserialization import DeserializationContext
from schemathesis.core.transport import Response
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from batchd.wire import decode_batch
from serverproc import ServerProcess, tiny_pack

pytestmark = pytest.mark.reliability

TOKEN = "fuzz-token"
EXAMPLES = env_int("BATCHD_FUZZ_EXAMPLES", 150)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@schemathesis.deserializer("application/msgpack")
def _msgpack(_ctx: DeserializationContext, response: Response) -> Any:
    batch = decode_batch(response.content)  # WireError (a failed check) if it is not a batch
    return {"dataset": batch.dataset, "epoch": batch.epoch, "batch": batch.batch}


_NO_PARAMETERS = {"GET /healthz", "GET /metrics", "GET /v1/datasets", "GET /v1/status"}
_seen: Counter[str] = Counter()
_lock = threading.Lock()


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data = tmp_path_factory.mktemp("fuzz")
    tiny_pack(data / "tiny", n=40, hw=8)
    with ServerProcess(data, token=TOKEN) as srv:
        yield srv


def _steer(case: Any) -> None:
    """Point some cases at the served pack with small valid numbers, so the engine and the
    msgpack body are exercised too (random names stop at 404, random pipelines at 400).
    Only values the schema allows are written, so positive cases stay positive."""
    path = case.path_parameters or {}
    roll = xxhash.xxh3_64_intdigest(repr((path, case.query)).encode()) % 3
    if "name" not in path or roll == 0:
        return
    path["name"] = "tiny"
    query = case.query if isinstance(case.query, dict) else None
    if roll == 2 and case.operation.label.endswith("/batches/{k}") and query is not None:
        if isinstance(path.get("k"), int):
            path["k"] = abs(path["k"]) % 6
        for key, value in (("augment", "[]"), ("world_size", 1), ("rank", 0)):
            if key in query:
                query[key] = value
        if isinstance(query.get("batch_size"), int) and query["batch_size"] >= 1:
            query["batch_size"] = 1 + query["batch_size"] % 16


def _operations(srv: ServerProcess) -> list[Any]:
    api = schemathesis.openapi.from_url(
        f"{srv.url}/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    return [result.ok() for result in api.get_all_operations()]


# schemathesis' pytest plugin (schema.parametrize) does not run under pytest 9 here, so
# each operation's strategy is driven by hypothesis directly, one test per mode.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_openapi_fuzz(fuzz_server: ServerProcess, mode: GenerationMode) -> None:
    operations = _operations(fuzz_server)
    assert {op.label for op in operations} >= {
        "GET /v1/datasets",
        "GET /v1/datasets/{name}",
        "GET /v1/datasets/{name}/batches/{k}",
    }
    for op in operations:

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES,
            derandomize=True,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Any) -> None:
            _steer(case)
            response = case.call_and_validate(
                headers={"Authorization": f"Bearer {TOKEN}"}, checks=CHECKS, timeout=30
            )
            with _lock:
                _seen[f"{case.operation.label} {response.status_code}"] += 1

        try:
            run()
        except Unsatisfiable:
            # No invalid request exists for an operation without parameters.
            assert mode == GenerationMode.NEGATIVE and op.label in _NO_PARAMETERS, op.label


def test_fuzz_figures(fuzz_server: ServerProcess, figures: Figures) -> None:
    """Runs after the fuzz cases (file order): the server is alive, no traceback; record counts."""
    assert fuzz_server.proc is not None and fuzz_server.proc.poll() is None
    log = fuzz_server.log()
    assert "Traceback" not in log and "internal error" not in log
    with _lock:
        seen = dict(_seen)
    if not seen:
        pytest.skip("the fuzz cases did not run (deselected)")
    figures.record(
        "schemathesis",
        examples_per_operation=EXAMPLES,
        requests=sum(seen.values()),
        by_operation_and_status=seen,
        server_errors=sum(
            v for k, v in seen.items() if k.endswith(tuple(f" 5{i:02d}" for i in range(100)))
        ),
        schema_violations=0,
    )
