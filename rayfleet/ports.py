"""Ports that stay free between the moment rayfleet picks them and the moment their owner binds.

A port from ``bind(("", 0))`` comes from the kernel's ephemeral range (32768-60999 on
Linux). The kernel hands the same range to every outgoing connection, and Ray picks its
own listeners' ports at random above such a port. An engine, a HAProxy ingress or a test
server binds its port only seconds after the pick, and in a busy Ray cluster that gap was
enough: CI saw an engine's KV-events port and HAProxy's port taken that way. So rayfleet
picks at random below the ephemeral range and above Ray's worker ports (10002-19999),
skipping ports anything listens on and ports that do not bind.

Single ports and blocks come from separate ranges. A stack's block of direct-ingress ports
is bound from its first port upwards, one port per ingress replica, over the stack's life:
a single port picked inside another stack's block could be the port a later replica of that
stack needs. Blocks sit in fixed slots, so a slot holding any listener is some live stack's.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

# Both below the kernel's ephemeral range and above Ray's worker ports (10002-19999).
PORT_RANGE = range(20000, 25000)  # single ports: engines, HAProxy's side listeners, peers, test servers
BLOCK_RANGE = range(25000, 30000)  # blocks in fixed slots: each stack's direct-ingress ports
PICK_ATTEMPTS = 200
TCP_LISTEN = "0A"  # the state column of /proc/net/tcp
# Not the module's generator: a benchmark that seeds ``random`` must not make two
# processes pick the same ports.
_chooser = random.SystemRandom()


def listening_ports() -> set[int]:
    """TCP ports anything on this machine listens on (Linux's /proc; empty elsewhere)."""
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == TCP_LISTEN:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def ephemeral_range() -> range:
    """The kernel's range for ports it assigns by itself; empty where it is unknown."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return range(0)
    return range(low, high + 1)


def port_in_use(host: str, port: int) -> bool:
    """Whether a listener could not bind ``port`` on ``host`` now. Like servers do, the
    probe reuses addresses, so a port whose old connections linger in TIME_WAIT is free."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _pick(bases: range, width: int, host: str) -> int:
    """A random ``base`` of ``bases`` with ``width`` ports from it that nothing listens on,
    outside the ephemeral range, ``base`` binding on ``host``. Falls back to a port the
    kernel assigns on a machine whose ephemeral range covers ours or where all is taken."""
    ephemeral, listening = ephemeral_range(), listening_ports()
    for base in _chooser.sample(bases, min(len(bases), PICK_ATTEMPTS)):
        block = range(base, base + width)
        if listening.isdisjoint(block) and not (base in ephemeral or block[-1] in ephemeral) and not port_in_use(host, base):
            return base
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def unused_port_block(width: int, host: str = "0.0.0.0") -> int:
    """The first of ``width`` consecutive ports, a free slot of ``BLOCK_RANGE``."""
    return _pick(range(BLOCK_RANGE.start, BLOCK_RANGE.stop - width + 1, width), width, host)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that nothing listens on and that binds on ``host``, for a listener about to start."""
    return _pick(PORT_RANGE, 1, host)
