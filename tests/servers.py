"""Helpers of the tests that start real servers (``mlflow server``, ``mlflow models serve``) as
subprocesses on 127.0.0.1: a free port, the venv's ``mlflow`` command, waiting for an HTTP endpoint
to answer 200, stopping the server's whole process group, and the TCP sockets a process listens on
(read from /proc, so a test can check that nothing listens beyond loopback)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlflow_command() -> list[str]:
    """The venv's ``mlflow`` console script next to this Python, else one on PATH, else ``python -m mlflow``."""
    exe = Path(sys.executable).parent / "mlflow"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("mlflow")
    return [found] if found else [sys.executable, "-m", "mlflow"]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def wait_until_answers(url: str, proc: subprocess.Popen, log_path: Path, timeout_s: float, what: str) -> None:
    """Poll ``url`` until it answers 200; fail the test (with the log's tail) when ``proc`` exits first
    or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while not answers(url):
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not answering {url} after {timeout_s:.0f}s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.25)


def stop_group(proc: subprocess.Popen) -> None:
    """Terminate a server started with ``start_new_session=True`` and its whole process group (server
    workers, job runners), then kill what is left."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group
    except ProcessLookupError:
        pass
    proc.wait(timeout=5)


def listening_addresses(pids=("self",)) -> list[str]:
    """``host:port`` of every TCP socket the processes ``pids`` (default: this one) listen on, IPv4 and
    IPv6, read from /proc (Linux). A process that is gone or not readable contributes nothing."""
    inodes = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    out = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A" or f[9] not in inodes:  # 0A: LISTEN
                continue
            host_hex, port_hex = f[1].split(":")
            raw = bytes.fromhex(host_hex)
            # /proc prints the address as 32-bit words in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            out.append(f"{socket.inet_ntop(family, raw)}:{int(port_hex, 16)}")
    return out


def is_loopback_listen(addr: str) -> bool:
    """Whether a ``host:port`` from :func:`listening_addresses` is reachable from this machine only."""
    host = addr.rsplit(":", 1)[0]
    return host == "::1" or host.startswith("127.") or host.startswith("::ffff:127.")
