"""A fork server for Flower's app processes: Flower's runtime and the app's libraries imported once.

Flower 1.41 runs every message a SuperNode receives in a new ``flwr-clientapp`` process, and every
run's ServerApp in a new ``flwr-serverapp`` process (each SuperExec's subprocess executor), which
import Python's and the app's modules afresh: on a 2-core machine 5-7 s a message, most of a
deployed round. This server imports them once and forks a child per process Flower asks for
(multiprocessing's ``forkserver`` idea): the child adopts the launching process's command line,
environment (each SuperNode's own ``FLWR_HOME``), working directory and standard streams, then runs
Flower's own entry point for that command, which pulls its message or run, installs the FAB and
loads the app from it as usual. The app's own modules (whatever the project directory holds) are
not kept: each child imports them from the FAB it was sent, so a changed app runs its new code.
Third-party modules (torch, numpy, Flower) are what stays warm.

The launching side is :mod:`fed_ser.flower.launcher`, put first on the SuperLink's and SuperNodes'
``PATH`` as ``flwr-clientapp`` and ``flwr-serverapp`` by ``fed-ser-deploy`` (``deploy.warm_apps``).

    python -m fed_ser.flower.forkserver SOCKET [--project DIR] [--entry COMMAND=MODULE:FUNCTION ...]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import selectors
import signal
import socket
import struct
import sys
import time
import traceback
from pathlib import Path

#: Flower's app process commands (its console scripts) and their entry points; the app's modules are read
#: from the project's pyproject.toml (``[tool.flwr.app.components]``)
ENTRIES = {"flwr-clientapp": "flwr.supernode.cli:flwr_clientapp", "flwr-serverapp": "flwr.superlink.cli:flwr_serverapp"}
MAX_REQUEST = 1 << 20


def app_modules(project: Path) -> list[str]:
    """The modules of the project's ServerApp and ClientApp (``[tool.flwr.app.components]``)."""
    import tomllib

    with open(project / "pyproject.toml", "rb") as f:
        components = tomllib.load(f)["tool"]["flwr"]["app"]["components"]
    return [ref.partition(":")[0] for ref in components.values()]


def _entry(ref: str):
    module, _, function = ref.partition(":")
    return getattr(importlib.import_module(module), function)


def preload(project: Path, entries: dict[str, str]) -> list[str]:
    """Import the entry points and everything the project's apps import, then forget the project's own
    modules (a child imports those from its FAB). Returns the project modules dropped."""
    for ref in entries.values():
        _entry(ref)
    for module in app_modules(project):
        importlib.import_module(module)
    root = project.resolve()
    # the project's own packages are its top-level folders and modules (a virtual environment inside
    # the project folder holds torch and Flower: those stay)
    own = [name for name, mod in list(sys.modules.items())
           if getattr(mod, "__file__", None) and _is_own(name.partition(".")[0], Path(mod.__file__).resolve(), root)]
    for name in own:
        del sys.modules[name]
    return own


def _is_own(top: str, file: Path, root: Path) -> bool:
    return file.is_relative_to(root / top) or file == root / f"{top}.py"


def _run_child(request: dict, fds: list[int], entry: str) -> int:
    """In the forked child: become the launcher's process (its Flower command) and run it."""
    for target, fd in zip((0, 1, 2), fds):
        os.dup2(fd, target)
    for fd in fds:
        os.close(fd)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = list(request["argv"])
    try:
        _entry(entry)()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def _read_request(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _flags, _addr = socket.recv_fds(conn, MAX_REQUEST, 3)
    if len(data) < 4:
        raise ValueError("short request")
    (n,) = struct.unpack("!I", data[:4])
    body = data[4:]
    while len(body) < n:
        chunk = conn.recv(n - len(body))
        if not chunk:
            raise ValueError("truncated request")
        body += chunk
    if len(fds) != 3:
        raise ValueError(f"expected 3 file descriptors, got {len(fds)}")
    return json.loads(body), fds


def serve(path: str | Path, project: str | Path, entries: dict[str, str] | None = None) -> None:
    """Listen on the Unix socket ``path`` and fork an app process per launcher; runs until SIGTERM.

    ``entries`` maps each command a launcher may ask for to its entry point (default: :data:`ENTRIES`);
    a launcher asking for another command is told so (pid -1) and runs the real command itself. On
    SIGTERM/SIGINT the server sends SIGTERM to every live child and exits (each child also watches the
    SuperExec that asked for it, as Flower's own processes do).
    """
    path, project, entries = Path(path), Path(project), dict(ENTRIES if entries is None else entries)
    dropped = preload(project, entries)
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(64)
    children: dict[int, tuple[socket.socket, float]] = {}  # pid -> its launcher's connection, fork time
    stopping: list[int] = []

    def stop(signum, _frame):
        stopping.append(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"[fed-ser] fork server for {', '.join(entries)} on {path}: Flower's runtime and the app's libraries loaded "
          f"({len(sys.modules)} modules; {len(dropped)} of the project's left to each FAB)", flush=True)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    try:
        while not stopping:
            for _key, _ in sel.select(timeout=0.05):
                conn, _ = listener.accept()
                try:
                    request, fds = _read_request(conn)
                except (OSError, ValueError) as exc:
                    print(f"[fed-ser] fork server: bad request ({exc})", file=sys.stderr, flush=True)
                    conn.close()
                    continue
                entry = entries.get(Path(str(request["argv"][0])).name)
                if entry is None:  # not ours to fork: the launcher runs the real command
                    conn.sendall(struct.pack("!i", -1))
                    conn.close()
                    for fd in fds:
                        os.close(fd)
                    continue
                pid = os.fork()
                if pid == 0:  # child
                    code = 1
                    try:
                        sel.close()
                        for held in (listener, conn, *(c for c, _ in children.values())):  # other launchers' connections too
                            held.close()
                        code = _run_child(request, fds, entry)
                    finally:
                        sys.stdout.flush()
                        sys.stderr.flush()
                        os._exit(code)
                for fd in fds:
                    os.close(fd)
                conn.sendall(struct.pack("!i", pid))
                children[pid] = (conn, time.monotonic())
                print(f"[fed-ser] fork server: {time.strftime('%H:%M:%S')} {request['argv'][0]} as pid {pid}", flush=True)
            while children:  # reap: each launcher gets its child's exit code
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                conn, started = children.pop(pid, (None, 0.0))
                if conn is not None:
                    code = os.waitstatus_to_exitcode(status)
                    print(f"[fed-ser] fork server: {time.strftime('%H:%M:%S')} pid {pid} exited {code} "
                          f"after {time.monotonic() - started:.2f} s", flush=True)
                    try:
                        conn.sendall(struct.pack("!i", code))
                    except OSError:
                        pass
                    conn.close()
    finally:
        for pid in children:  # a child never outlives the server that forked it
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        listener.close()
        path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fed_ser.flower.forkserver", description=serve.__doc__)
    p.add_argument("socket", type=Path)
    p.add_argument("--project", type=Path, default=Path(__file__).resolve().parents[2])
    p.add_argument("--entry", action="append", default=[], metavar="COMMAND=MODULE:FUNCTION",
                   help="what a child runs for COMMAND (default: Flower's entry points for flwr-clientapp and flwr-serverapp)")
    a = p.parse_args(argv)
    entries = dict(ENTRIES)
    for item in a.entry:
        command, sep, ref = item.partition("=")
        if not sep or ":" not in ref:
            p.error(f"--entry {item!r}: expected COMMAND=MODULE:FUNCTION")
        entries[command] = ref
    serve(a.socket, a.project, entries)


if __name__ == "__main__":
    main()
