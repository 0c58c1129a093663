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
Third-party modules (torch, numpy, Flower) are what stays warm; each child reseeds numpy's and
torch's global generators, as a fresh process would have its own.

What a child does not adopt from its launcher: whatever a module read from the environment when the
server imported it (Flower's ``FLWR_LOG_LEVEL`` and ``FLWR_TELEMETRY_*``, thread counts, ``PYTHONPATH``
and so ``sys.path``): the server is started with the federation's environment, which the launchers
inherit apart from each node's ``FLWR_HOME``, and Flower reads that one when it is used. Whoever can
connect to the socket could start Flower app processes as this user, so the socket is created 0600
(in a folder only the user can open), every connection's peer credentials (``SO_PEERCRED``) must be
this user's, and the server never replaces anything at its path but a stale socket of its own.

The launching side is :mod:`fed_ser.deployment.warm_apps.launcher`, put first on the SuperLink's and
SuperNodes' ``PATH`` as ``flwr-clientapp`` and ``flwr-serverapp`` by ``fed-ser-deploy`` (``deploy.warm_apps``).

    python -m fed_ser.deployment.warm_apps.forkserver SOCKET [--project DIR] [--entry COMMAND=MODULE:FUNCTION ...]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import selectors
import signal
import socket
import stat
import struct
import sys
import time
import traceback
from pathlib import Path

from fed_ser.deployment.project import app_modules

#: Flower's app process commands (its console scripts) and their entry points; the app's modules are read
#: from the project's pyproject.toml (:func:`fed_ser.deployment.project.app_modules`)
ENTRIES = {"flwr-clientapp": "flwr.supernode.cli:flwr_clientapp", "flwr-serverapp": "flwr.superlink.cli:flwr_serverapp"}
MAX_REQUEST = 1 << 20


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


#: signals the launcher forwards to its child; blocked around fork so none lands between fork and reset
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


def _fresh_randomness() -> None:
    """Reseed the generators a forked child would otherwise share with its siblings: numpy's and torch's
    global ones (Python's ``random`` reseeds itself after a fork). Flower's LocalDpMod draws its noise from
    ``np.random``, SecAgg+ its rounding: every child must draw as a freshly started process would."""
    import random

    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    if "torch" in sys.modules:
        sys.modules["torch"].seed()


def _run_child(request: dict, fds: list[int], entry: str) -> int:
    """In the forked child: become the launcher's process (its Flower command) and run it."""
    for target, fd in zip((0, 1, 2), fds):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    for sig in (*SIGNALS, signal.SIGCHLD):
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = list(request["argv"])
    _fresh_randomness()
    try:
        _entry(entry)()
    except SystemExit as exc:
        if isinstance(exc.code, int) or exc.code is None:
            return exc.code or 0
        print(exc.code, file=sys.stderr)  # as the interpreter does for sys.exit("message")
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def _read_request(conn: socket.socket) -> tuple[dict, list[int]]:
    """One launcher's request: its command line, environment and working directory, and its three
    standard streams. On any error the received descriptors are closed before raising."""
    data, fds, _flags, _addr = socket.recv_fds(conn, MAX_REQUEST, 3)
    try:
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
        request = json.loads(body)
        if not (isinstance(request.get("argv"), list) and request["argv"] and isinstance(request.get("env"), dict)
                and isinstance(request.get("cwd"), str)):
            raise ValueError("a request needs argv, env and cwd")
        return request, fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _send(conn: socket.socket, value: int) -> None:
    try:
        conn.sendall(struct.pack("!i", value))
    except OSError:  # the launcher is gone: nothing waits for this value
        pass


def peer_uid(conn: socket.socket) -> tuple[int, int]:
    """``(pid, uid)`` of the process at the other end of a Unix socket (``SO_PEERCRED``)."""
    pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid, uid


def claim_path(path: Path) -> None:
    """Make room for the server's socket at ``path``: nothing may be there but a stale socket of this user
    (one no server listens on), which is removed. Anything else (a file, a folder, another user's socket, a
    live server) is refused, never deleted."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid():
        raise FileExistsError(f"{path}: exists and is not a socket of this user; the fork server will not replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:  # stale: the server that bound it is gone
        path.unlink()
        return
    finally:
        probe.close()
    raise FileExistsError(f"{path}: another server listens on this socket")


class ForkServer:
    """Listen on the Unix socket ``path`` and fork an app process per launcher; :meth:`serve` runs until SIGTERM.

    ``entries`` maps each command a launcher may ask for to its entry point (default: :data:`ENTRIES`);
    a launcher asking for another command is told so (pid -1) and runs the real command itself. A bad
    request, a peer that is not ``uid`` (default: this process's user), or a launcher that disconnects
    early costs that launcher only. A launcher whose connection closes while its child runs (it was
    killed) has its child sent SIGTERM. On SIGTERM/SIGINT/SIGHUP the server waits up to ``grace`` seconds
    for live children (each also watches the SuperExec that asked for it, as Flower's own processes do),
    then sends SIGTERM, then SIGKILL, and removes its socket (if the path still is that socket).
    """

    def __init__(self, path: str | Path, project: str | Path, entries: dict[str, str] | None = None,
                 grace: float = 10.0, uid: int | None = None) -> None:
        self.path, self.project = Path(path), Path(project)
        self.entries = dict(ENTRIES if entries is None else entries)
        self.grace = grace
        self.uid = os.getuid() if uid is None else uid
        self.children: dict[int, tuple[socket.socket, float]] = {}  # pid -> its launcher's connection, fork time
        self.stopping: list[int] = []
        self.server_pid = os.getpid()
        self.sel = selectors.DefaultSelector()
        self.listener: socket.socket | None = None
        self._bound: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket this server created

    def bind(self) -> None:
        """Create the socket 0600 (no moment where another user could connect) and listen."""
        claim_path(self.path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.listener.bind(str(self.path))
        finally:
            os.umask(old)
        st = os.lstat(self.path)
        self._bound = (st.st_dev, st.st_ino)
        self.listener.listen(64)
        self.sel.register(self.listener, selectors.EVENT_READ, None)

    def serve(self) -> None:
        """Preload, bind, and fork for launchers until a stop signal; then stop the children and clean up."""
        claim_path(self.path)  # a path that is not ours is refused before seconds of imports
        dropped = preload(self.project, self.entries)
        self.bind()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda signum, _frame: self.stopping.append(signum))
        print(f"[fed-ser] fork server for {', '.join(self.entries)} on {self.path}: Flower's runtime and the app's "
              f"libraries loaded ({len(sys.modules)} modules; {len(dropped)} of the project's left to each FAB)", flush=True)
        try:
            while not self.stopping:
                for key, _ in self.sel.select(timeout=0.05):
                    if key.data is None:
                        self._accept()
                    elif key.data in self.children:  # its launcher closed the connection: it was killed
                        self.sel.unregister(key.fileobj)
                        _kill(key.data, signal.SIGTERM)
                self.reap()
        finally:
            if os.getpid() == self.server_pid:  # never in a child
                self.shutdown()

    def _accept(self) -> None:
        assert self.listener is not None
        conn, _ = self.listener.accept()
        conn.settimeout(10.0)  # a launcher that stalls mid-request holds the server 10 s at most
        try:
            pid, uid = peer_uid(conn)
            if uid != self.uid:
                print(f"[fed-ser] fork server: refused a connection from pid {pid}, uid {uid} (serves uid {self.uid} only)",
                      file=sys.stderr, flush=True)
                conn.close()
                return
            self._fork_for(conn)
        except Exception as exc:  # one launcher's trouble is never the server's end
            print(f"[fed-ser] fork server: request failed ({exc!r})", file=sys.stderr, flush=True)
            conn.close()

    def _fork_for(self, conn: socket.socket) -> None:
        try:
            request, fds = _read_request(conn)
        except (OSError, ValueError) as exc:
            print(f"[fed-ser] fork server: bad request ({exc})", file=sys.stderr, flush=True)
            conn.close()
            return
        entry = self.entries.get(Path(str(request["argv"][0])).name)
        pid = -1
        if entry is not None:  # else not ours to fork: the launcher runs the real command
            signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)  # none may land between fork and the child's reset
            try:
                pid = os.fork()
            except OSError as exc:
                print(f"[fed-ser] fork server: cannot fork ({exc})", file=sys.stderr, flush=True)
            if pid == 0:  # child: never returns into the server's loop
                self._become_child(conn, request, fds, entry)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        for fd in fds:
            os.close(fd)
        _send(conn, pid)
        if pid < 0:
            conn.close()
            return
        self.children[pid] = (conn, time.monotonic())
        self.sel.register(conn, selectors.EVENT_READ, pid)  # readable only when its launcher is gone
        print(f"[fed-ser] fork server: {time.strftime('%H:%M:%S')} {Path(request['argv'][0]).name} as pid {pid}", flush=True)

    def _become_child(self, conn: socket.socket, request: dict, fds: list[int], entry: str) -> None:
        code = 1
        try:
            self.sel.close()
            assert self.listener is not None
            for held in (self.listener, conn, *(c for c, _ in self.children.values())):  # other launchers' connections too
                held.close()
            code = _run_child(request, fds, entry)
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)

    def reap(self) -> None:
        """Collect exited children; each launcher gets its child's exit code."""
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn, started = self.children.pop(pid, (None, 0.0))
            if conn is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            print(f"[fed-ser] fork server: {time.strftime('%H:%M:%S')} pid {pid} exited {code} "
                  f"after {time.monotonic() - started:.2f} s", flush=True)
            if conn in (k.fileobj for k in self.sel.get_map().values()):
                self.sel.unregister(conn)
            _send(conn, code)
            conn.close()

    def shutdown(self) -> None:
        """Wait ``grace`` seconds for live children, then SIGTERM, then SIGKILL; remove the socket if the
        path still is the one this server created."""
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                for pid in list(self.children):
                    _kill(pid, sig)
            deadline = time.monotonic() + self.grace
            while self.children and time.monotonic() < deadline:
                self.reap()
                time.sleep(0.05)
            if not self.children:
                break
        if self.listener is not None:
            self.listener.close()
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._bound:
                self.path.unlink()
        except FileNotFoundError:
            pass


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fed_ser.deployment.warm_apps.forkserver", description=ForkServer.__doc__)
    p.add_argument("socket", type=Path)
    p.add_argument("--project", type=Path, default=Path(__file__).resolve().parents[3])
    p.add_argument("--entry", action="append", default=[], metavar="COMMAND=MODULE:FUNCTION",
                   help="what a child runs for COMMAND (default: Flower's entry points for flwr-clientapp and flwr-serverapp)")
    p.add_argument("--uid", type=int, default=None, help="the only user whose launchers are served (default: this one)")
    a = p.parse_args(argv)
    entries = dict(ENTRIES)
    for item in a.entry:
        command, sep, ref = item.partition("=")
        if not sep or ":" not in ref:
            p.error(f"--entry {item!r}: expected COMMAND=MODULE:FUNCTION")
        entries[command] = ref
    try:
        ForkServer(a.socket, a.project, entries, uid=a.uid).serve()
    except FileExistsError as exc:
        sys.exit(f"[fed-ser] fork server: {exc}")


if __name__ == "__main__":
    main()
