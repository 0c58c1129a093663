"""``flwr-clientapp`` / ``flwr-serverapp`` as a SuperExec starts them, but forked from a warm process.

Flower 1.41 starts one ClientApp process per message (``flwr-clientapp --token ...``) and one
ServerApp process per run: Python, Flower's runtime and the app's torch are imported again each
time, 5-7 s on a 2-core machine. ``fed-ser-deploy`` puts wrappers of those names first on the
SuperLink's and SuperNodes' ``PATH`` that run this file (stdlib only, started with ``python -I -S``
so it costs ~20 ms): it hands its command line, environment, working directory and standard
streams to the fork server (:mod:`fed_ser.deployment.warm_apps.forkserver`), which forks a child that already
has those modules imported and runs Flower's own entry point for the command in it. This process
stays as the app process's stand-in: it forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT to the child (one
that arrives before the child exists waits for it) and exits with the child's exit code (or dies of
the child's signal).

Where no fork server answers (``FED_SER_FORKSERVER`` unset, its socket gone, the command not one it
forks, or the server fails before forking), it becomes the real command (``exec``), so nothing breaks
and nothing runs twice. It hands its environment only to a server running as its own user (the
socket's peer credentials, ``SO_PEERCRED``): a socket some other user put at that path gets nothing.

    python -I -S launcher.py REAL_COMMAND [its arguments ...]
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys

SERVER_ENV = "FED_SER_FORKSERVER"  # the fork server's Unix socket


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the fork server closed the connection")  # an OSError
        buf += chunk
    return buf


def _connect() -> socket.socket | None:
    path = os.environ.get(SERVER_ENV, "")
    if not path:
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
        _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    except OSError:
        conn.close()
        return None
    if uid != os.getuid():  # not our server: it gets neither our environment nor our streams
        conn.close()
        return None
    return conn


SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)  # forwarded to the child


def _exec(real: str, args: list[str]):
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)  # a blocked mask would survive exec
    os.execv(real, [real, *args])


def main(argv: list[str]) -> int:
    """Run the command ``argv[0]`` (a Flower app command: its basename says which) with ``argv[1:]`` in a
    child of the fork server, or ``exec`` it where no server forks it."""
    real, args = argv[0], argv[1:]
    # a signal that arrives before the child's pid is known waits, then goes to the child
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    conn = _connect()
    if conn is None:
        _exec(real, args)
    with conn:
        try:
            request = json.dumps({"argv": [real, *args], "env": dict(os.environ), "cwd": os.getcwd()}).encode()
            socket.send_fds(conn, [struct.pack("!I", len(request)) + request], [0, 1, 2])
            (pid,) = struct.unpack("!i", _recv_exact(conn, 4))
        except OSError:  # the server failed before forking: nothing runs yet, so run the real command
            pid = -1
        if pid <= 0:  # the server does not fork this command: run the real one instead
            _exec(real, args)
        return _wait(conn, pid)


def _wait(conn: socket.socket, pid: int) -> int:
    """Stand in for the child ``pid``: forward signals to it, exit as it exits."""

    def forward(signum, _frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for sig in SIGNALS:
        signal.signal(sig, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
    try:
        (code,) = struct.unpack("!i", _recv_exact(conn, 4))
    except OSError:  # the server died before the child did: its state is unknown
        return 1
    if code < 0:  # the child died of a signal: so does its stand-in, for whoever waits on it
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
