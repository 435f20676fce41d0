"""Is a server on this host, and which user runs it: what a shared-memory body needs.

A body in shared memory is mapped only from a server on this host whose user owns the
file (docs/protocol.md). Two kinds of connection guarantee the same host: a unix socket,
and TCP to a loopback address (the kernel never routes 127.0.0.0/8 or ::1 off the
machine). The server's user comes from the kernel in both cases:

* unix socket: ``SO_PEERCRED`` on our end;
* loopback TCP: the uid column of the server's end of this very connection in
  ``/proc/net/tcp`` or ``/proc/net/tcp6``, the line whose local address is our peer
  and whose remote address is us. An accepted socket belongs to the listener's user.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
import sys

__all__ = ["peer_uid"]


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a unix or loopback TCP socket, if known."""
    if sock.family == socket.AF_UNIX:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return int(struct.unpack("3i", creds)[1])
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        ours, theirs = sock.getsockname(), sock.getpeername()
    except OSError:
        return None
    if not ipaddress.ip_address(theirs[0]).is_loopback:
        return None
    table = "/proc/net/tcp" if sock.family == socket.AF_INET else "/proc/net/tcp6"
    want = (_proc_address(sock.family, theirs), _proc_address(sock.family, ours))
    with contextlib.suppress(OSError), open(table, encoding="ascii") as f:
        next(f, None)  # the column titles
        for line in f:
            # sl local_address rem_address st tx:rx tr:when retrnsmt uid ...
            cols = line.split()
            if len(cols) > 7 and (cols[1], cols[2]) == want:
                return int(cols[7])
    return None


def _proc_address(family: int, addr: tuple[str, int] | tuple[str, int, int, int]) -> str:
    """``addr`` as /proc/net/tcp* prints it: each 32-bit word of the address in host
    byte order as 8 hex digits, then ``:`` and the port as 4."""
    raw = socket.inet_pton(family, addr[0])
    words = (int.from_bytes(raw[i : i + 4], sys.byteorder) for i in range(0, len(raw), 4))
    return "".join(f"{w:08X}" for w in words) + f":{addr[1]:04X}"
