"""Same-host detection and the server's uid, which shared-memory bodies rest on."""

from __future__ import annotations

import os
import socket
import sys

import pytest

from batchd._peer import _proc_address, peer_uid
from batchd.wire import is_loopback_host


def test_loopback_hosts() -> None:
    for host in ("127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost", "LocalHost."):
        assert is_loopback_host(host), host
    for host in ("0.0.0.0", "10.0.0.5", "::", "example.com", "localhost.example.com", ""):
        assert not is_loopback_host(host), host


@pytest.mark.skipif(sys.byteorder != "little", reason="the expected strings are x86/arm64 ones")
def test_proc_net_tcp_address_format() -> None:
    assert _proc_address(socket.AF_INET, ("127.0.0.1", 8080)) == "0100007F:1F90"
    assert _proc_address(socket.AF_INET6, ("::1", 443, 0, 0)) == "0" * 24 + "01000000:01BB"


def _pair(family: int, host: str) -> tuple[socket.socket, socket.socket, socket.socket]:
    listener = socket.socket(family)
    listener.bind((host, 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname()[:2])
    server, _ = listener.accept()
    return listener, client, server


@pytest.mark.parametrize(
    ("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
)
def test_peer_uid_of_a_loopback_tcp_connection(family: int, host: str) -> None:
    try:
        socks = _pair(family, host)
    except OSError as exc:  # a machine without IPv6 on lo
        pytest.skip(f"no {host} here: {exc}")
    try:
        _, client, server = socks
        assert peer_uid(client) == os.getuid()
        assert peer_uid(server) == os.getuid()  # either end finds the other
        client.close()
        assert peer_uid(client) is None  # not connected any more: nothing to look up
    finally:
        for s in socks:
            s.close()


def test_peer_uid_of_a_unix_socket() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert peer_uid(a) == os.getuid()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run the listener as another user")
def test_peer_uid_names_the_listeners_user_not_ours() -> None:
    # A socket belongs to the user who created it, and an accepted one to the listener's:
    # a server run as nobody is nobody, whoever connects.
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: become nobody, then listen, accept and wait
        try:
            os.close(r)
            os.setuid(65534)
            with socket.socket() as listener:
                listener.bind(("127.0.0.1", 0))
                listener.listen(1)
                os.write(w, listener.getsockname()[1].to_bytes(2, "big"))
                conn, _ = listener.accept()
                conn.recv(1)
        finally:
            os._exit(0)
    os.close(w)
    try:
        port = int.from_bytes(os.read(r, 2), "big")
        with socket.create_connection(("127.0.0.1", port)) as client:
            assert peer_uid(client) == 65534
    finally:
        os.close(r)
        os.waitpid(pid, 0)
