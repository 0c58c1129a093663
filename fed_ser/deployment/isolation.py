"""A network of the deployer's own: a private network namespace for a local federation's processes.

Flower 1.41 serves the Fleet, Control and Runtime APIs on one SuperLink port, and the Control API has
no account login in open-source Flower (Flower Enterprise adds OIDC): whoever can connect to that port
can register a SuperNode and start a run, i.e. run code as the deployer. Node authentication and TLS do
not change that (TLS authenticates the server only). Every local user shares the host's 127.0.0.1, so
loopback alone keeps out only other machines.

:class:`PrivateNetwork` creates, without privileges, a user namespace owning a fresh network namespace
(``unshare --user --map-root-user --net``) with only its own loopback up, and starts each of the
federation's processes inside it (``nsenter``): the SuperLink, SuperNodes, SuperExecs, app processes,
the fork server and the deployer's ``flwr`` commands. Their 127.0.0.1 is not the host's: a process
outside the namespace cannot connect to any of their ports, and another user cannot enter the
namespace (joining it needs capabilities in its user namespace, which only its owner, the deployer,
and root hold). Files stay the deployer's: the namespace maps its root to the deployer's user.

Where the kernel refuses unprivileged user namespaces (``kernel.unprivileged_userns_clone=0``, or
Ubuntu's AppArmor restriction), :class:`IsolationUnavailable` says so, and ``deploy.isolation=none``
runs the federation on the shared loopback instead, open to every local user.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys

#: run inside the fresh namespaces: bring loopback up (SIOCGIFFLAGS / SIOCSIFFLAGS | IFF_UP), say so,
#: then hold the namespaces until the federation closes this process's stdin
_HOLDER = """
import fcntl, socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
req = struct.pack("16sH22x", b"lo", 0)
flags = struct.unpack("16sH22x", fcntl.ioctl(s, 0x8913, req))[1]
fcntl.ioctl(s, 0x8914, struct.pack("16sH22x", b"lo", flags | 1))
print("ready", flush=True)
sys.stdin.read()
"""

#: exits 0 once something accepts connections on 127.0.0.1:argv[1] (within argv[2] seconds), else 1
_PROBE = """
import socket, sys, time
port, deadline = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
while True:
    with socket.socket() as s:
        s.settimeout(0.5)
        if s.connect_ex(("127.0.0.1", port)) == 0:
            sys.exit(0)
    if time.monotonic() > deadline:
        sys.exit(1)
    time.sleep(0.1)
"""


class IsolationUnavailable(RuntimeError):
    """The platform gives no private network namespace; the message says what failed and the opt-out."""


class PrivateNetwork:
    """A user + network namespace held by one small process; :meth:`wrap` runs a command inside it."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.env = dict(env or {})  # extra environment of the holder (a marker that names its federation)
        self.holder: subprocess.Popen | None = None

    def start(self, timeout: float = 15.0) -> PrivateNetwork:
        """Create the namespaces (loopback up) and hold them; raise :class:`IsolationUnavailable` if refused."""
        unshare, nsenter = shutil.which("unshare"), shutil.which("nsenter")
        if unshare is None or nsenter is None:
            raise IsolationUnavailable("unshare/nsenter (util-linux) are not installed: no private network for the "
                                       "federation; set deploy.isolation=none to run it on the shared loopback, open to every local user")
        self.holder = subprocess.Popen([unshare, "--user", "--map-root-user", "--net", "--", sys.executable, "-I", "-S", "-c", _HOLDER],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       env={"PATH": os.environ.get("PATH", ""), **self.env}, start_new_session=True)
        out = b""
        assert self.holder.stdout is not None
        if select.select([self.holder.stdout], [], [], timeout)[0]:
            out = self.holder.stdout.readline()
        if out.strip() != b"ready":
            err = (self.holder.stderr.read() if self.holder.stderr and self.holder.poll() is not None else b"").decode(errors="replace")
            self.close()
            raise IsolationUnavailable(
                f"cannot create a private network namespace ({err.strip() or 'unshare --user --net failed'}): unprivileged user "
                "namespaces are disabled here. Set deploy.isolation=none to run on the shared loopback, where every local "
                "user can reach the SuperLink's Control API")
        return self

    @property
    def running(self) -> bool:
        return self.holder is not None and self.holder.poll() is None

    def wrap(self, cmd: list[str]) -> list[str]:
        """``cmd`` run inside the namespaces (``nsenter`` then ``exec``: the process keeps its pid)."""
        if not self.running:
            raise RuntimeError("the federation's private network is not running")
        assert self.holder is not None
        return [shutil.which("nsenter") or "nsenter", "--target", str(self.holder.pid), "--user", "--net",
                "--preserve-credentials", "--", *cmd]

    def listening(self, port: int, timeout: float) -> bool:
        """Whether something inside accepts connections on 127.0.0.1:``port`` within ``timeout`` seconds."""
        probe = self.wrap([sys.executable, "-I", "-S", "-c", _PROBE, str(port), str(timeout)])
        return subprocess.run(probe, capture_output=True, timeout=timeout + 30).returncode == 0

    def close(self) -> None:
        """Let the holder go (the namespaces end with the last process inside them)."""
        holder, self.holder = self.holder, None
        if holder is None:
            return
        for stream in (holder.stdin, holder.stdout, holder.stderr):
            if stream is not None:
                stream.close()
        try:
            holder.wait(5)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait(5)
