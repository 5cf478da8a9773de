"""Loaded by every Python process started with this folder first on ``PYTHONPATH`` (the supervisor, the input check,
torchrun's launcher, every rank): an offline machine. Each name lookup of a host other than this machine and each
connection to an address other than the loopback is refused, as a machine without a network refuses it, and written
to ``$YOLOSAFE_TEST_NETLOG`` (pid, command line, target, the Python frames that asked), so a test can assert that no
process of a run tried the network. The ranks' own rendezvous (loopback) is untouched."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import traceback

_LOG = os.environ.get("YOLOSAFE_TEST_NETLOG")
_LOCAL = {"localhost", "", socket.gethostname()}


def _local(host: object) -> bool:
    if host is None or (isinstance(host, bytes) and not host):
        return True
    host = host.decode() if isinstance(host, bytes) else str(host)
    if host in _LOCAL or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _refuse(what: str, target: object) -> None:
    with open(_LOG, "a") as fh:
        fh.write(f"pid {os.getpid()} {' '.join(sys.argv)[:200]}: {what} {target!r}\n")
        fh.write("".join(traceback.format_stack()[:-2]))
    raise OSError(101, f"Network is unreachable (an offline machine: {what} {target!r})")


if _LOG:
    _getaddrinfo, _connect, _connect_ex = socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex

    def getaddrinfo(host, *args, **kwargs):
        if not _local(host):
            _refuse("getaddrinfo", host)
        return _getaddrinfo(host, *args, **kwargs)

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
            _refuse("connect", address)
        return _connect(self, address)

    def connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
            _refuse("connect", address)
        return _connect_ex(self, address)

    socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex = getaddrinfo, connect, connect_ex
