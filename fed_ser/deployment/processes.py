"""Process supervision for a local federation: ports, stopping process groups, the workdir lock, and
SIGTERM/SIGHUP handled as Ctrl-C, so that every process a deployment started is stopped however it ends."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fed_ser.deployment.certificates import HOST


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None, name: str = "") -> None:
    """Block until something accepts connections on 127.0.0.1:port; fail early if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{name or 'process'} exited with code {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{name or 'process'}: nothing listened on {HOST}:{port} within {timeout:.0f} s")


def terminate(proc: subprocess.Popen, sig: int, timeout: float, group: bool = True) -> None:
    """Signal ``proc`` (its process group), wait, SIGKILL if it lingers; never raises for a process
    that will not be reaped (it has been killed; the OS reaps it). Drains a piped output."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL) if group else proc.kill()
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                print(f"[deploy] process {proc.pid} was killed but is not reaped yet", file=sys.stderr, flush=True)
    if proc.stdout is not None and not proc.stdout.closed:
        try:
            proc.stdout.read()
        finally:
            proc.stdout.close()


def kill_by_environment(markers: list[bytes]) -> list[int]:
    """SIGKILL every process (but this one) whose environment holds one of ``markers`` (``NAME=value``);
    return their pids. Linux ``/proc``; processes of other users are not readable, so not touched."""
    ends = [m + b"\0" for m in markers]
    killed = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            data = env.read_bytes()
            pid = int(env.parent.name)
            if pid != os.getpid() and any(data.startswith(m) or b"\0" + m in data for m in ends):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        except (OSError, ValueError):
            continue
    return killed


class WorkdirBusy(RuntimeError):
    """Another deployment holds this workdir; the message names its pid."""


def lock_workdir(workdir: Path) -> int:
    """Hold ``<workdir>/.lock`` (an exclusive ``flock``) for this process; return its descriptor (close it to
    release). Two deployments sharing a workdir would stop each other's processes and replace each other's
    certificates: the second is refused, naming the first."""
    fd = os.open(workdir / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise WorkdirBusy(f"{workdir}: in use by another deployment (pid {holder}); stop it or choose another "
                          "deploy.workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: unwinds like Ctrl-C (every ``finally`` and ``with`` runs)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


@contextmanager
def stop_on_signals(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGHUP)) -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise :class:`Stopped` in the main thread, as Ctrl-C raises
    KeyboardInterrupt; a second one during the clean-up is ignored, so the clean-up finishes."""

    def handler(signum, _frame):
        for s in signals:
            signal.signal(s, signal.SIG_IGN)
        raise Stopped(signum)

    old = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
