"""Client receive path: GB/s for one large batch body over loopback.

A forked process serves a fixed body (default 38 MB, a 128 x 224 x 224 x 3 uint8
batch plus headers) with ``Content-Length`` over HTTP/1.1 keep-alive, on TCP and
on a unix socket, writing it with one ``sendall`` so the server side costs as
little as possible. Each candidate receives the whole body ``--reps`` times over
one persistent connection; the figure is the median GB/s (1 GB = 1e9 bytes).

Candidates:

- ``raw-socket``: ``recv_into`` one reused ``np.empty`` buffer on a plain socket, HTTP
  headers parsed by hand: the ceiling for any HTTP client on this machine.
- ``httpx-content``: ``httpx.Client.get(url).content``.
- ``httpx-stream``: ``httpx`` streaming, chunks copied into a fresh ``np.empty``.
- ``http.client-bytearray`` / ``http.client-np.empty``: ``HTTPResponse.readinto`` a
  fresh ``bytearray`` / ``np.empty`` per body (the cost of faulting in new memory).
- ``batchd-tcp`` / ``batchd-unix``: batchd's transport (``http.client`` readinto a
  numpy buffer recycled once nothing views it, what the client ships).

Run: ``python -m benchmarks.bench_receive [--json] [--mb 38] [--reps 15]``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import httpx
import numpy as np

from batchd._transport import Transport


def _serve_conn(conn: socket.socket, head: bytes, body: bytes) -> None:
    with conn:
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
            _, buf = buf.split(b"\r\n\r\n", 1)
            conn.sendall(head)
            conn.sendall(body)


def _serve(listener: socket.socket, nbytes: int) -> None:
    body = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8).tobytes()
    head = (
        f"HTTP/1.1 200 OK\r\nContent-Type: application/msgpack\r\nContent-Length: {nbytes}\r\n\r\n"
    ).encode()
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_serve_conn, args=(conn, head, body), daemon=True).start()


def _start_server(
    family: int, address: str | tuple[str, int], nbytes: int
) -> tuple[multiprocessing.process.BaseProcess, str | tuple[str, int]]:
    listener = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(address)
    listener.listen(16)
    bound = listener.getsockname()
    proc = multiprocessing.get_context("fork").Process(
        target=_serve, args=(listener, nbytes), daemon=True
    )
    proc.start()
    listener.close()
    return proc, bound


def _raw_socket(host: str, port: int, nbytes: int) -> Callable[[], int]:
    sock = socket.create_connection((host, port))
    request = b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"
    view = memoryview(np.empty(nbytes, dtype=np.uint8))

    def once() -> int:
        sock.sendall(request)
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)  # byte-wise so no body bytes are swallowed
        pos = 0
        while pos < nbytes:
            pos += sock.recv_into(view[pos:])
        return pos

    return once


def _httpx_content(url: str) -> Callable[[], int]:
    client = httpx.Client(timeout=60)
    return lambda: len(client.get(url).content)


def _httpx_stream(url: str) -> Callable[[], int]:
    client = httpx.Client(timeout=60)

    def once() -> int:
        with client.stream("GET", url) as resp:
            buf = np.empty(int(resp.headers["content-length"]), dtype=np.uint8)
            pos = 0
            for chunk in resp.iter_raw():
                buf[pos : pos + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
                pos += len(chunk)
            return pos

    return once


def _http_client(host: str, port: int, alloc: Callable[[int], object]) -> Callable[[], int]:
    conn = http.client.HTTPConnection(host, port, timeout=60)

    def once() -> int:
        conn.request("GET", "/b")
        resp = conn.getresponse()
        view = memoryview(alloc(resp.length or 0)).cast("B")  # type: ignore[arg-type]
        pos = 0
        while pos < len(view):
            pos += resp.readinto(view[pos:])
        return pos

    return once


def _batchd(url: str) -> Callable[[], int]:
    transport = Transport([url], token=None, timeout=60.0, retry_deadline=10.0)
    return lambda: len(transport.get("/b").body)


def _measure(once: Callable[[], int], nbytes: int, reps: int) -> dict[str, float]:
    once()  # warm: connection set up, page tables touched once
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        got = once()
        dt = time.perf_counter() - t0
        if got != nbytes:
            raise RuntimeError(f"received {got} bytes, expected {nbytes}")
        rates.append(nbytes / dt / 1e9)
    return {
        "median_gbps": round(statistics.median(rates), 3),
        "best_gbps": round(max(rates), 3),
        "worst_gbps": round(min(rates), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--mb", type=float, default=38.0, help="body size in MB (1e6 bytes)")
    parser.add_argument("--reps", type=int, default=15, help="timed receives per candidate")
    parser.add_argument("--only", default="", help="comma-separated candidate names")
    args = parser.parse_args(argv)
    nbytes = int(args.mb * 1e6)

    tmp = tempfile.mkdtemp(prefix="batchd-bench-")
    sock_path = os.path.join(tmp, "s.sock")
    tcp_proc, tcp_addr = _start_server(socket.AF_INET, ("127.0.0.1", 0), nbytes)
    unix_proc, _ = _start_server(socket.AF_UNIX, sock_path, nbytes)
    assert isinstance(tcp_addr, tuple)
    host, port = tcp_addr
    url = f"http://{host}:{port}/b"
    candidates: dict[str, Callable[[], Callable[[], int]]] = {
        "raw-socket": lambda: _raw_socket(host, port, nbytes),
        "httpx-content": lambda: _httpx_content(url),
        "httpx-stream": lambda: _httpx_stream(url),
        "http.client-bytearray": lambda: _http_client(host, port, bytearray),
        "http.client-np.empty": lambda: _http_client(
            host, port, lambda n: np.empty(n, dtype=np.uint8)
        ),
        "batchd-tcp": lambda: _batchd(f"http://{host}:{port}"),
        "batchd-unix": lambda: _batchd(f"unix://{sock_path}"),
    }
    only = [c for c in args.only.split(",") if c]
    results: dict[str, dict[str, float]] = {}
    try:
        for name, make in candidates.items():
            if only and name not in only:
                continue
            results[name] = _measure(make(), nbytes, args.reps)
            if not args.json:
                r = results[name]
                print(
                    f"{name:24s} {r['median_gbps']:6.2f} GB/s median "
                    f"({r['worst_gbps']:.2f}..{r['best_gbps']:.2f})",
                    flush=True,
                )
    finally:
        tcp_proc.terminate()
        unix_proc.terminate()
        tcp_proc.join()
        unix_proc.join()
        os.unlink(sock_path)
        os.rmdir(tmp)
    if args.json:
        print(
            json.dumps(
                {
                    "benchmark": "bench_receive",
                    "body_bytes": nbytes,
                    "reps": args.reps,
                    "python": sys.version.split()[0],
                    "numpy": np.__version__,
                    "httpx": httpx.__version__,
                    "cpus": os.cpu_count(),
                    "machine": platform.machine(),
                    "results": results,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
