"""The HTTP API (docs/protocol.md): thin FastAPI handlers over :class:`Engine`.

Every error is JSON ``{"error": code, "detail": message}``: the engine's
:class:`~batchd_server.errors.Rejected` (each kind owns its status and code, and is
mapped here once), FastAPI's type errors (turned from 422 into 400 naming the
parameter), unknown routes and methods, and the bearer-token check. Bad input gets a
4xx and never a 5xx; a 500 means a bug in batchd (logged with its traceback).

Auth (:mod:`.auth`) is a plain ASGI middleware so it covers every route (the OpenAPI
pages too) except ``/healthz``. Another counts every answer by status class for
``/metrics`` and ``/v1/status``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from batchd import __version__
from batchd.wire import (
    CLIENT_HEADER,
    MAX_SEED,
    MAX_SHM_RELEASES,
    MAX_SPLIT_CHARS,
    MAX_WORLD_SIZE,
    MSGPACK_MEDIA,
    SHM_MEDIA,
    SHM_RELEASE_HEADER,
    WAIT_HEADER,
    is_loopback_host,
)

from ..errors import Rejected
from .auth import PAGE_PATHS, BearerAuth
from .engine import Engine
from .metrics import Metrics
from .page import status_page
from .request import MAX_BATCH_SIZE, BatchRequest
from .schema import Status
from .status import Overview, client_mark

__all__ = ["create_app"]

log = logging.getLogger("batchd.app")


def _same_host(request: Request) -> bool:
    """A unix-socket peer (no address) or a loopback one: it can open our /dev/shm files.

    ``serve`` keeps bodies in shared memory only on a unix socket or a loopback bind, so
    this holds for every peer there; it still guards any other way the app is run.
    """
    return request.client is None or is_loopback_host(request.client.host)


# uvicorn/httptools refuse a request line over ~64 KiB (a plain-text 400 outside our
# JSON contract); 4096 characters percent-encode to at most 48 KiB even as 4-byte UTF-8,
# so every augment the schema allows reaches the app (found by schemathesis, issue 7).
_MAX_AUGMENT_CHARS = 4096


class ErrorBody(BaseModel):
    """Every error answer."""

    error: str
    detail: str


def _range(low: int, high: int | None = None) -> dict[str, Any]:
    """The range for the schema only: ``BatchRequest`` checks it (serve/request.py)."""
    return {"minimum": low} if high is None else {"minimum": low, "maximum": high}


# Module level: with postponed annotations FastAPI resolves these by name from here.
# Types only: every range is checked once, by BatchRequest, and documented here.
Name = Annotated[str, Path(description="dataset name (a directory under --data)")]
Seed = Annotated[int, Query(description="0 .. 2^63-1", json_schema_extra=_range(0, MAX_SEED))]
Rank = Annotated[
    int, Query(description="this trainer's rank, 0 .. world_size-1", json_schema_extra=_range(0))
]
WorldSize = Annotated[
    int,
    Query(
        description="number of trainers sharing the epoch",
        json_schema_extra=_range(1, MAX_WORLD_SIZE),
    ),
]
BatchSize = Annotated[
    int, Query(description="samples per batch", json_schema_extra=_range(1, MAX_BATCH_SIZE))
]
Split = Annotated[
    str | None,
    Query(
        description="a split of the pack, tfds slice syntax: [:80%], [80%:], [:1000], "
        "[:20%]+[40%:] (docs/protocol.md); absent: the whole pack",
        json_schema_extra={"maxLength": MAX_SPLIT_CHARS},
    ),
]
SplitSeed = Annotated[
    int,
    Query(
        description="the split order's seed, 0 .. 2^63-1 (with split)",
        json_schema_extra=_range(0, MAX_SEED),
    ),
]
Stratify = Annotated[
    str | None,
    Query(
        description="an integer field: cut the split in proportion within each of its values",
        json_schema_extra={"maxLength": 64},
    ),
]

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "A parameter, name or pipeline is invalid"},
    401: {"model": ErrorBody, "description": "Missing or wrong bearer token"},
    404: {"model": ErrorBody, "description": "Unknown dataset or batch index out of range"},
}


def _error(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


class _CountAnswers:
    """Counts every answer by status class (``batchd_http_responses_total``)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.counters = {c: metrics.responses.labels(f"{c}xx") for c in range(1, 6)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                counter = self.counters.get(int(message["status"]) // 100)
                if counter is not None:
                    counter.inc()
            await send(message)

        await self.app(scope, receive, counted)


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        where = loc[0] if loc else "request"
        name = ".".join(loc[1:]) or where
        parts.append(f"{where} parameter {name!r}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def create_app(engine: Engine, *, token: str | None = None) -> FastAPI:
    """The ASGI app serving ``engine``; with ``token``, bearer auth on all but /healthz."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.close()

    app = FastAPI(
        title="batchd",
        version=__version__,
        description=(
            "Shuffled, augmented training batches from memory-mapped packs (docs/protocol.md)."
        ),
        lifespan=lifespan,
        # No 307 to the slash-less path: a trailing slash (or a name with an encoded one)
        # gets the JSON 404 of docs/protocol.md like any other unknown route (issue 7).
        redirect_slashes=False,
    )
    app.state.engine = engine
    metrics = engine.metrics

    @app.exception_handler(Rejected)
    async def _rejected(_req: Request, exc: Rejected) -> JSONResponse:
        metrics.rejected.labels(exc.code).inc()
        return _error(exc.status, exc.code, exc.detail, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.rejected.labels("invalid_parameter").inc()
        return _error(400, "invalid_parameter", _validation_detail(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(req: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        detail = (
            f"no route {req.url.path}; see docs/protocol.md (routes are under /v1)"
            if exc.status_code == 404
            else str(exc.detail)
        )
        metrics.rejected.labels(code).inc()
        return _error(exc.status_code, code, detail, dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _bug(_req: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error", exc_info=exc)
        return _error(
            500, "internal", f"internal error in batchd ({type(exc).__name__}); see the server log"
        )

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/metrics",
        tags=["ops"],
        response_class=Response,
        responses={
            200: {"content": {"text/plain": {}}, "description": "Prometheus text format"},
            401: _ERRORS[401],
        },
    )
    async def prometheus() -> Response:
        text = await asyncio.to_thread(metrics.render)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    overview = Overview(engine)

    async def page() -> HTMLResponse:
        return HTMLResponse(status_page(), headers={"Cache-Control": "no-store"})

    for path in sorted(PAGE_PATHS):
        app.add_api_route(path, page, methods=["GET"], include_in_schema=False)

    @app.get("/v1/status", tags=["ops"], response_model=Status, responses={401: _ERRORS[401]})
    async def status() -> dict[str, Any]:
        """Datasets, live jobs (progress, images/s, ETA, trainers, data stall) and load."""
        return await overview.document()

    @app.get("/v1/datasets", tags=["datasets"], responses=_ERRORS)
    async def list_datasets() -> dict[str, Any]:
        return {"datasets": await engine.list()}

    @app.get("/v1/datasets/{name}", tags=["datasets"], responses=_ERRORS)
    async def dataset_info(
        name: Name,
        batch_size: Annotated[
            int | None,
            Query(description="add the epoch plan", json_schema_extra=_range(1, MAX_BATCH_SIZE)),
        ] = None,
        shuffle: bool = True,
        drop_last: bool = False,
        rank: Rank = 0,
        world_size: WorldSize = 1,
        augment: Annotated[
            str | None,
            Query(
                max_length=_MAX_AUGMENT_CHARS,
                description="add batch_fields: what this pipeline outputs",
            ),
        ] = None,
        split: Split = None,
        split_seed: SplitSeed = 0,
        stratify: Stratify = None,
    ) -> dict[str, Any]:
        return await engine.info(
            name,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            rank=rank,
            world_size=world_size,
            augment=augment,
            split=split,
            split_seed=split_seed,
            stratify=stratify,
        )

    @app.get(
        "/v1/datasets/{name}/batches/{k}",
        tags=["datasets"],
        response_class=Response,
        responses={
            200: {
                "content": {MSGPACK_MEDIA: {}, SHM_MEDIA: {}},
                "description": "msgpack batch body, or with X-Batchd-Shm: 1 from a client "
                "on this host its shared-memory path (docs/protocol.md)",
            },
            **_ERRORS,
            409: {"model": ErrorBody, "description": "The pack changed on disk or is corrupt"},
            413: {"model": ErrorBody, "description": "The body would exceed --max-batch-bytes"},
            503: {"model": ErrorBody, "description": "Too many batches computing; retry"},
        },
    )
    async def batch(
        request: Request,
        name: Name,
        k: Annotated[int, Path(description="batch index within this rank's epoch")],
        batch_size: BatchSize,
        seed: Seed = 0,
        epoch: Seed = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        rank: Rank = 0,
        world_size: WorldSize = 1,
        augment: Annotated[
            str, Query(max_length=_MAX_AUGMENT_CHARS, description="pipeline, compact JSON list")
        ] = "[]",
        split: Split = None,
        split_seed: SplitSeed = 0,
        stratify: Stratify = None,
    ) -> Response:
        start = time.perf_counter()
        released = request.headers.get(SHM_RELEASE_HEADER)
        if released and engine.shm is not None:  # tokens of bodies this client unmapped
            engine.shm.release(released.split()[:MAX_SHM_RELEASES])
        served = await engine.batch(
            BatchRequest(
                dataset=name,
                k=k,
                batch_size=batch_size,
                seed=seed,
                epoch=epoch,
                shuffle=shuffle,
                drop_last=drop_last,
                rank=rank,
                world_size=world_size,
                augment=augment,
                split=split,
                split_seed=split_seed,
                stratify=stratify,
            ),
            client_mark(
                request.headers.get(CLIENT_HEADER),
                request.headers.get(WAIT_HEADER),
                None if request.client is None else request.client.host,
            ),
        )
        metrics.latency.observe(time.perf_counter() - start)
        metrics.batches.labels(name).inc()
        metrics.bytes.labels(name).inc(served.body.nbytes)
        headers = {
            "X-Batchd-Fingerprint": served.fingerprint,
            "X-Batchd-Cache": served.source,
            "X-Batchd-Batches": str(served.num_batches),
        }
        # The header is read raw, not declared: only batchd clients on this host send it,
        # and generic clients must keep getting the bytes. Only a cached body outlives
        # this answer: an uncached one's file would be gone before the client opened it.
        if (
            engine.shm is not None
            and served.cached
            and request.headers.get("x-batchd-shm") == "1"
            and _same_host(request)
        ):
            lent = engine.shm.lend(served.body)
            if lent is not None:
                ref = {
                    "path": lent[0],
                    "length": served.body.nbytes,
                    "fingerprint": served.fingerprint,
                    "release": lent[1],
                }
                return Response(json.dumps(ref).encode(), media_type=SHM_MEDIA, headers=headers)
        # A memoryview body is sent as it is: Starlette and uvicorn never copy it.
        return Response(served.body.data, media_type=MSGPACK_MEDIA, headers=headers)

    def openapi() -> dict[str, Any]:
        # Validation errors are answered 400 (handler above), never FastAPI's 422: drop
        # the 422 it declares on every operation so the schema says what the server does
        # (schemathesis checks responses against it: tests/reliability/test_http_fuzz.py).
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            for ops in schema.get("paths", {}).values():
                for op in ops.values():
                    op.get("responses", {}).pop("422", None)
            for unused in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(unused, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    if token is not None:
        app.add_middleware(BearerAuth, token=token)
    app.add_middleware(_CountAnswers, metrics=metrics)  # outermost: 401s count too
    return app
