"""A real local federation: one SuperLink and N SuperNodes as separate processes on 127.0.0.1.

Flower's deployment engine, not the simulation: the SuperLink serves the Fleet, Control and
Runtime APIs over HTTPS on one port; each SuperNode holds one speaker shard (its node config
``partition-id``) and runs the same ClientApp; the app is started with ``flwr run`` against a
connection written to ``$FLWR_HOME/config.toml``. Secure by default:

- every process runs in a private network namespace of the deployer's (:mod:`.isolation`): no other
  local user can reach the SuperLink's Control API (which has no login in open-source Flower 1.41),
  its Fleet and Runtime APIs, or the SuperNodes' ClientAppIo APIs;
- TLS with a fresh CA whose key is never written, and a server certificate for 127.0.0.1
  (:mod:`.certificates`); keys are born 0600 in 0700 folders;
- SuperNode authentication: the SuperLink runs with ``--enable-supernode-auth`` and only nodes
  whose public keys were registered (``flwr supernode register``) may join.

``insecure=True`` turns TLS and node authentication off; ``isolation="none"`` runs on the shared
loopback. :class:`LocalFederation` locks its workdir, starts every process, waits until they are
ready, and stops every process it started, also on errors.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from fed_ser.deployment.certificates import HOST, make_certificates, make_node_keys, private_dir
from fed_ser.deployment.isolation import PrivateNetwork
from fed_ser.deployment.processes import free_port, kill_by_environment, lock_workdir, terminate, wait_for_port
from fed_ser.deployment.project import PROJECT
from fed_ser.deployment.staging import stage_app
from fed_ser.deployment.warm_apps import launcher

__all__ = ["HOST", "LAUNCHER", "PROJECT", "LocalFederation", "RunFailed", "free_port", "stage_app", "wait_for_port",
           "write_connection"]

#: the launcher a warm federation puts first on its processes' PATH under the names of Flower's app commands
#: (a stdlib-only script, run by path)
LAUNCHER = Path(launcher.__file__)
WARM_COMMANDS = ("flwr-clientapp", "flwr-serverapp")
ISOLATIONS = ("netns", "none")
#: What every Flower process of a local federation runs with unless the environment says otherwise:
#: no telemetry (Flower's processes would each post events to telemetry.flower.ai: nothing may leave
#: 127.0.0.1), and the SuperExec looking for a new task every 0.1 s instead of every 1 s (it starts one
#: ClientApp process per message, so its polling adds to every round).
FLOWER_DEFAULTS = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}
#: every process a federation starts carries ``FED_SER_FEDERATION=<its workdir>``: what stops the strays
MARKER = "FED_SER_FEDERATION"


def _bin(name: str) -> str:
    """A Flower console script of this environment (beside the running interpreter)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def write_connection(flwr_home: Path, address: str, root_certificates: Path | None) -> None:
    """``$FLWR_HOME/config.toml`` with the connection ``fedser`` (TLS unless no CA is given)."""
    lines = ["[superlink]", 'default = "fedser"', "", "[superlink.fedser]", f'address = "{address}"']
    lines += ["insecure = true"] if root_certificates is None else [f'root-certificates = "{root_certificates}"']
    Path(flwr_home).mkdir(parents=True, exist_ok=True)
    (Path(flwr_home) / "config.toml").write_text("\n".join(lines) + "\n")


class RunFailed(RuntimeError):
    """``flwr run`` failed or did not end; the message carries its output and each process's log tail."""

    def __init__(self, what: str, output: str, logs: dict[str, str]) -> None:
        parts = [what, "--- flwr run output (ServerApp log) ---", output[-4000:]]
        parts += [f"--- {name}.log (tail) ---\n{text}" for name, text in logs.items()]
        super().__init__("\n".join(parts))
        self.output, self.logs = output, logs


@dataclass
class LocalFederation:
    """SuperLink + ``num_nodes`` SuperNodes on 127.0.0.1, as a context manager.

    ``workdir`` (locked while this object lives: a second deployment there is refused) receives the
    certificates, node keys, ``flwr_home``, each process's log and each run's staged app.
    ``registered`` limits which node keys are registered with the SuperLink (default: all), so a test
    can start a node whose key is not. ``gateway_nodes`` reach the SuperLink through the Fleet-only
    gateway (:mod:`fed_ser.deployment.gateway`, what the compose demo's nodes use) instead of directly.

    ``warm_apps`` (default) starts a fork server (:mod:`fed_ser.deployment.warm_apps.forkserver`) and puts
    ``flwr-clientapp`` and ``flwr-serverapp`` launchers first on every process's ``PATH``: each message's
    ClientApp process and each run's ServerApp process is then forked with Flower's runtime and torch
    already imported, instead of importing them again. Flower still asks for one ClientApp process per
    message, which pulls it, installs the FAB and loads the app from it; only the imports are shared.
    """

    workdir: Path
    num_nodes: int
    insecure: bool = False
    registered: list[int] | None = None
    startup_timeout: float = 60.0
    warm_apps: bool = True
    isolation: str = "netns"
    gateway_nodes: tuple[int, ...] = ()
    port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs_open: list = field(default_factory=list)  # every process log this federation opened (closed on stop)
    runs: list[subprocess.Popen] = field(default_factory=list)  # `flwr run` processes started here

    def __post_init__(self) -> None:
        if self.isolation not in ISOLATIONS:
            raise ValueError(f"deploy.isolation: {self.isolation!r} is not one of {ISOLATIONS}")
        self.workdir = Path(self.workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock: int | None = lock_workdir(self.workdir)  # before anything in it is touched
        try:
            self._prepare_workdir()
        except BaseException:
            os.close(self._lock)
            raise

    def _prepare_workdir(self) -> None:
        self.net: PrivateNetwork | None = None
        self.staged: list[Path] = []
        self.gateway_port = free_port() if self.gateway_nodes else None
        self.home = private_dir(self.workdir / "flwr_home")
        self.certs = None if self.insecure else make_certificates(self.workdir / "certs")
        self.keys = None if self.insecure else make_node_keys(self.workdir / "keys", self.num_nodes)
        self.env = {**FLOWER_DEFAULTS, **os.environ, "FLWR_HOME": str(self.home),
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONPATH": str(PROJECT), MARKER: str(self.workdir),
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # Flower spawns its own scripts
        write_connection(self.home, f"{HOST}:{self.port}", None if self.insecure else self.certs["ca"])
        self.forkserver_socket: Path | None = None
        if self.warm_apps:
            # a Unix socket path holds at most 107 bytes: a short folder of its own, not the workdir; mkdtemp
            # makes it 0700, the server makes the socket 0600 and serves this user's launchers only
            self.forkserver_socket = Path(tempfile.mkdtemp(prefix="fed-ser-")) / "forkserver.sock"
            self.env.update({"PATH": f"{self._write_launchers()}{os.pathsep}{self.env['PATH']}",
                             launcher.SERVER_ENV: str(self.forkserver_socket)})

    def _write_launchers(self) -> Path:
        """``bin/flwr-clientapp`` and ``bin/flwr-serverapp``: the stdlib-only launcher, which hands the
        SuperExec's command to the fork server or, if none answers, runs Flower's own."""
        folder = private_dir(self.workdir / "bin")
        for command in WARM_COMMANDS:
            wrapper = folder / command
            wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -I -S "{LAUNCHER}" "{_bin(command)}" "$@"\n')
            wrapper.chmod(0o700)
        return folder

    # -- the private network ----------------------------------------------------------------------
    def _wrap(self, cmd: list[str]) -> list[str]:
        """``cmd`` as this federation runs it: inside its private network unless ``isolation="none"``."""
        if self.isolation == "none":
            return cmd
        if self.net is None or not self.net.running:
            self.net = PrivateNetwork({MARKER: str(self.workdir)}).start()
        return self.net.wrap(cmd)

    def _wait_listening(self, port: int, proc: subprocess.Popen, name: str) -> None:
        if self.isolation == "none":
            return wait_for_port(port, self.startup_timeout, proc, name)
        self._wrap([])  # the network exists
        assert self.net is not None
        deadline = time.monotonic() + self.startup_timeout
        while not self.net.listening(port, 1.0):
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode} before listening on {port}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: nothing listened on {HOST}:{port} within {self.startup_timeout:.0f} s")

    # -- processes ------------------------------------------------------------------------------
    def _start(self, name: str, cmd: list[str], home: Path | None = None) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 (held by the process, closed in close())
        self.logs_open.append(log)
        env = self.env if home is None else {**self.env, "FLWR_HOME": str(home)}
        proc = subprocess.Popen(self._wrap(cmd), cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: stopping it stops its children
        proc.log = log  # type: ignore[attr-defined]
        self.procs[name] = proc
        return proc

    def start_forkserver(self) -> None:
        """Start the fork server (its imports take seconds: :meth:`wait_for_forkserver` waits for them)."""
        assert self.forkserver_socket is not None
        self._start("forkserver", [sys.executable, "-m", "fed_ser.deployment.warm_apps.forkserver",
                                   str(self.forkserver_socket), "--project", str(PROJECT)])

    def wait_for_forkserver(self) -> None:
        """Block until the fork server listens; fail naming its log if it died or took too long."""
        assert self.forkserver_socket is not None
        proc = self.procs["forkserver"]
        deadline = time.monotonic() + self.startup_timeout
        while not self.forkserver_socket.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"the fork server exited with code {proc.returncode} (log: {self.workdir / 'forkserver.log'})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the fork server did not start within {self.startup_timeout:.0f} s")
            time.sleep(0.1)

    def node_home(self, i: int) -> Path:
        """SuperNode ``i``'s own ``FLWR_HOME``: as on separate machines, each node installs the app
        (FAB) into its own folder; Flower's install is not safe for several nodes sharing one."""
        return self.workdir / f"supernode{i}_home"

    def superlink_command(self) -> list[str]:
        """The SuperLink's command line (also what ``docker/compose.yaml`` runs, with container paths)."""
        cmd = [_bin("flower-superlink"), "--host", HOST, "--port", str(self.port), "--database",
               str(self.workdir / "state.db"), "--disable-runtime-dependency-installation"]
        if self.insecure:
            return cmd + ["--insecure"]
        return cmd + ["--ssl-ca-certfile", str(self.certs["ca"]), "--ssl-certfile", str(self.certs["cert"]),
                      "--ssl-keyfile", str(self.certs["key"]), "--enable-supernode-auth"]

    def start_superlink(self) -> None:
        self._wait_listening(self.port, self._start("superlink", self.superlink_command()), "flower-superlink")

    def gateway_command(self) -> list[str]:
        """The Fleet-only gateway's command line (what the compose demo's nodes connect to)."""
        assert self.gateway_port is not None and self.certs is not None
        return [sys.executable, "-m", "fed_ser.deployment.gateway", "--listen", f"{HOST}:{self.gateway_port}",
                "--upstream", f"{HOST}:{self.port}", "--certfile", str(self.certs["cert"]), "--keyfile",
                str(self.certs["key"]), "--ca", str(self.certs["ca"])]

    def start_gateway(self) -> None:
        assert self.gateway_port is not None
        self._wait_listening(self.gateway_port, self._start("gateway", self.gateway_command()), "fleet gateway")

    def register_nodes(self) -> None:
        """Register the allowed node public keys with the SuperLink (``flwr supernode register``)."""
        if self.insecure:
            return
        for i in self.registered if self.registered is not None else range(self.num_nodes):
            try:
                self.flwr("supernode", "register", str(self.keys[i][1]), "fedser")
            except RuntimeError as exc:  # the SuperLink's state.db outlives it: a restart keeps the registry
                if "Public key already in use" not in str(exc):
                    raise

    def supernode_command(self, i: int, num_partitions: int | None = None, port: int | None = None) -> list[str]:
        """SuperNode ``i``'s command line: it holds shard ``partition-id=i``."""
        n = num_partitions or self.num_nodes
        link = self.gateway_port if i in self.gateway_nodes and not self.insecure else self.port
        cmd = [_bin("flower-supernode"), "--superlink", f"{HOST}:{link}", "--host", HOST, "--port",
               str(port or free_port()), "--node-config", f"partition-id={i} num-partitions={n}", "--max-retries", "5"]
        if self.insecure:
            return cmd + ["--insecure"]
        return cmd + ["--root-certificates", str(self.certs["ca"]), "--auth-supernode-private-key", str(self.keys[i][0])]

    def start_supernode(self, i: int, num_partitions: int | None = None) -> subprocess.Popen:
        """Start SuperNode ``i`` (shard ``partition-id=i``)."""
        home = private_dir(self.node_home(i))
        return self._start(f"supernode{i}", self.supernode_command(i, num_partitions), home)

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        """Stop one process and its process group (its ClientApp/ServerApp children), whatever fails:
        SIGTERM, then SIGKILL; a process that still cannot be reaped is left to the OS, never to
        stop the rest of the clean-up. Its log file is closed."""
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        try:
            terminate(proc, sig, timeout)
        finally:
            log = getattr(proc, "log", None)
            if log is not None:
                log.close()

    def __enter__(self) -> LocalFederation:
        try:
            if self.warm_apps:
                self.start_forkserver()  # its imports overlap the SuperLink's start
            self.start_superlink()
            if self.gateway_nodes and not self.insecure:
                self.start_gateway()
            self.register_nodes()
            if self.warm_apps:
                self.wait_for_forkserver()
            for i in range(self.num_nodes):
                self.start_supernode(i)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop every process of this federation (``flwr run`` processes, nodes, the SuperLink, then the fork
        server) and any stray one Flower detached (SuperExec); close every log, remove the staged apps, let
        the private network go, release the workdir. One failure stops nothing else."""
        try:
            for run in self.runs:
                terminate(run, signal.SIGTERM, 10.0, group=False)
            # the nodes, the SuperLink, then the fork server: the app processes it forked end with their SuperExecs
            last = ("superlink", "forkserver")
            for name in [n for n in self.procs if n not in last] + [n for n in last if n in self.procs]:
                try:
                    self.stop(name)
                except Exception as exc:
                    print(f"[deploy] could not stop {name}: {exc}", file=sys.stderr, flush=True)
            self._stop_strays()
        finally:
            for log in self.logs_open:
                log.close()
            if self.forkserver_socket is not None:
                shutil.rmtree(self.forkserver_socket.parent, ignore_errors=True)
            for folder in self.staged:
                shutil.rmtree(folder, ignore_errors=True)
            self.staged = []
            if self.net is not None:
                self.net.close()
            if self._lock is not None:
                os.close(self._lock)
                self._lock = None

    def _stop_strays(self) -> None:
        """Kill leftover processes of this federation (Linux ``/proc``): its marker, or one of its ``FLWR_HOME``s.

        Flower starts SuperExec and app processes in their own sessions; one whose parent died
        (a refused SuperNode) would outlive the federation. The workdir lock makes them this federation's own.
        """
        homes = [self.home] + [self.node_home(i) for i in range(self.num_nodes)]
        kill_by_environment([f"{MARKER}={self.workdir}".encode()] + [f"FLWR_HOME={h}".encode() for h in homes])

    def __exit__(self, *exc) -> None:
        self.close()

    # -- flwr CLI -------------------------------------------------------------------------------
    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI against this federation (inside its network); raise with its output on failure."""
        res = subprocess.run(self._wrap([_bin("flwr"), *args]), cwd=PROJECT, env=self.env, capture_output=True, text=True,
                             timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res

    def run(self, run_config: dict, timeout: float = 1800.0) -> subprocess.CompletedProcess:
        """``flwr run <project> fedser --stream`` with the flat run-config keys; returns when the run ends."""
        proc = self.start_run(run_config)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            proc.kill()
            out = proc.communicate()[0] or ""
            raise RunFailed(f"flwr run did not end within {timeout:.0f} s", out, self.log_tails()) from exc
        if proc.returncode != 0:
            raise RunFailed(f"flwr run failed ({proc.returncode})", out, self.log_tails())
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")

    def log_tails(self, chars: int = 2500) -> dict[str, str]:
        """The end of every process log of this federation (what a failed run needs to be understood)."""
        return {log.stem: log.read_bytes()[-chars:].decode("utf-8", "replace") for log in sorted(self.workdir.glob("*.log"))}

    def start_run(self, run_config: dict) -> subprocess.Popen:
        """Start ``flwr run ... --stream`` without waiting (its output: the ServerApp's log). The caller
        reads its output (``communicate``); :meth:`close` stops it if it is still running. The app is run
        from a staged copy of its FAB's files in a fresh folder (:func:`~fed_ser.deployment.staging.stage_app`)."""
        cfg = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        app = stage_app(self.workdir / "staged")
        self.staged.append(app)
        proc = subprocess.Popen(self._wrap([_bin("flwr"), "run", str(app), "fedser", "--run-config", cfg, "--stream"]),
                                cwd=PROJECT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.runs.append(proc)
        return proc
