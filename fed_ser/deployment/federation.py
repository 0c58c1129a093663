"""A real local federation: one SuperLink and N SuperNodes as separate processes on 127.0.0.1.

Flower's deployment engine, not the simulation: the SuperLink serves the Fleet, Control and
Runtime APIs over HTTPS on one port; each SuperNode holds one speaker shard (its node config
``partition-id``) and runs the same ClientApp; the app is started with ``flwr run`` against a
connection written to ``$FLWR_HOME/config.toml``. Secure by default:

- TLS with a project CA and a server certificate for 127.0.0.1 (:func:`make_certificates`);
- SuperNode authentication: the SuperLink runs with ``--enable-supernode-auth`` and only nodes
  whose public keys were registered (``flwr supernode register``) may join (:func:`make_node_keys`).

``insecure=True`` (the CLI's ``--insecure``) turns both off. :class:`LocalFederation` starts every
process, waits until they are ready, and stops every process it started, also on errors.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fed_ser.experiments.cli import run_settings, seconds_per_round
from fed_ser.experiments.config import load_config
from fed_ser.experiments.prepare import prepare
from fed_ser.flower import launcher
from fed_ser.flower.forkserver import flwr_app
from fed_ser.io import atomic_write_json

PROJECT = Path(__file__).resolve().parents[2]
#: the launcher a warm federation puts first on its processes' PATH under the names of Flower's app commands
#: (a stdlib-only script, run by path)
LAUNCHER = Path(launcher.__file__)
WARM_COMMANDS = ("flwr-clientapp", "flwr-serverapp")
HOST = "127.0.0.1"  # a local federation never listens on or talks to any other address
#: What every Flower process of a local federation runs with unless the environment says otherwise:
#: no telemetry (Flower's processes would each post events to telemetry.flower.ai: nothing may leave
#: 127.0.0.1), and the SuperExec looking for a new task every 0.1 s instead of every 1 s (it starts one
#: ClientApp process per message, so its polling adds to every round).
FLOWER_DEFAULTS = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}


def _bin(name: str) -> str:
    """A Flower console script of this environment (beside the running interpreter)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey, openssh: bool = False) -> None:
    fmt = serialization.PrivateFormat.OpenSSH if openssh else serialization.PrivateFormat.PKCS8
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()))
    path.chmod(0o600)


def make_certificates(folder: str | Path, days: int = 30, hostnames: tuple[str, ...] = ()) -> dict[str, Path]:
    """A self-signed CA and a server certificate for 127.0.0.1/localhost (+ ``hostnames``) signed by it.

    Returns the paths ``ca`` (the root SuperNodes and the CLI trust), ``cert`` and ``key`` (the
    SuperLink's). Existing files are kept, so restarts reuse the same CA.
    """
    folder = Path(folder)
    paths = {"ca": folder / "ca.crt", "ca_key": folder / "ca.key", "cert": folder / "server.pem", "key": folder / "server.key"}
    if all(p.exists() for p in paths.values()):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fed-ser local CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), *map(x509.DNSName, hostnames),
                                       x509.IPAddress(ipaddress.ip_address(HOST))])
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(san, critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))
    _write_key(paths["ca_key"], ca_key)
    _write_key(paths["key"], key)
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return paths


def make_node_keys(folder: str | Path, n: int) -> list[tuple[Path, Path]]:
    """``n`` SuperNode key pairs (EC P-384, OpenSSH format, as ``ssh-keygen -t ecdsa -b 384`` writes them)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    for i in range(n):
        priv, pub = folder / f"node{i}.key", folder / f"node{i}.pub"
        if not (priv.exists() and pub.exists()):
            key = ec.generate_private_key(ec.SECP384R1())
            _write_key(priv, key, openssh=True)
            pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                          serialization.PublicFormat.OpenSSH))
        pairs.append((priv, pub))
    return pairs


def write_connection(flwr_home: Path, address: str, root_certificates: Path | None) -> None:
    """``$FLWR_HOME/config.toml`` with the connection ``fedser`` (TLS unless no CA is given)."""
    lines = ["[superlink]", 'default = "fedser"', "", "[superlink.fedser]", f'address = "{address}"']
    lines += ["insecure = true"] if root_certificates is None else [f'root-certificates = "{root_certificates}"']
    Path(flwr_home).mkdir(parents=True, exist_ok=True)
    (Path(flwr_home) / "config.toml").write_text("\n".join(lines) + "\n")


def stage_app(folder: str | Path, project: Path = PROJECT) -> Path:
    """Copy the files the app's FAB is built from (``fab-include``, and pyproject.toml) into ``folder``,
    replacing what was there; return it. ``flwr run`` builds the same FAB from it as from ``project``."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for pattern in flwr_app(project)["fab-include"]:
        for src in project.glob(pattern):
            if src.is_file() and "__pycache__" not in src.parts:
                dst = tmp / src.relative_to(project)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
    shutil.copy2(project / "pyproject.toml", tmp / "pyproject.toml")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


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


def _terminate(proc: subprocess.Popen, sig: int, timeout: float, group: bool = True) -> None:
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

    ``workdir`` receives certificates, node keys, ``flwr_home`` and each process's log.
    ``registered`` limits which node keys are registered with the SuperLink (default: all), so
    a test can start a node whose key is not.

    ``warm_apps`` (default) starts a fork server (:mod:`fed_ser.flower.forkserver`) and puts
    ``flwr-clientapp`` and ``flwr-serverapp`` launchers first on every process's ``PATH``: each
    message's ClientApp process and each run's ServerApp process is then forked with Flower's runtime
    and torch already imported, instead of importing them again (5-7 s a message on 2 cores). Flower
    still asks for one ClientApp process per message, which pulls it, installs the FAB and loads the
    app from it; only the imports are shared.
    """

    workdir: Path
    num_nodes: int
    insecure: bool = False
    registered: list[int] | None = None
    startup_timeout: float = 60.0
    warm_apps: bool = True
    port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs_open: list = field(default_factory=list)  # every process log this federation opened (closed on stop)
    runs: list[subprocess.Popen] = field(default_factory=list)  # `flwr run` processes started here

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.home = self.workdir / "flwr_home"
        self.home.mkdir(exist_ok=True)
        self.certs = None if self.insecure else make_certificates(self.workdir / "certs")
        self.keys = None if self.insecure else make_node_keys(self.workdir / "keys", self.num_nodes)
        self.env = {**FLOWER_DEFAULTS, **os.environ, "FLWR_HOME": str(self.home),
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONPATH": str(PROJECT),
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # Flower spawns its own scripts
        write_connection(self.home, f"{HOST}:{self.port}", None if self.insecure else self.certs["ca"])
        self.forkserver_socket: Path | None = None
        if self.warm_apps:
            # a Unix socket path holds at most 107 bytes: a short folder of its own, not the workdir; mkdtemp
            # makes it 0700, so only this user can ask the server for an app process
            self.forkserver_socket = Path(tempfile.mkdtemp(prefix="fed-ser-")) / "forkserver.sock"
            self.env.update({"PATH": f"{self._write_launchers()}{os.pathsep}{self.env['PATH']}",
                             launcher.SERVER_ENV: str(self.forkserver_socket)})

    def _write_launchers(self) -> Path:
        """``bin/flwr-clientapp`` and ``bin/flwr-serverapp``: the stdlib-only launcher (:mod:`fed_ser.flower.launcher`),
        which hands the SuperExec's command to the fork server or, if none answers, runs Flower's own."""
        folder = self.workdir / "bin"
        folder.mkdir(exist_ok=True)
        for command in WARM_COMMANDS:
            wrapper = folder / command
            wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -I -S "{LAUNCHER}" "{_bin(command)}" "$@"\n')
            wrapper.chmod(0o755)
        return folder

    def start_forkserver(self) -> None:
        """Start the fork server (its imports take seconds: :meth:`wait_for_forkserver` waits for them)."""
        assert self.forkserver_socket is not None
        self._start("forkserver", [sys.executable, "-m", "fed_ser.flower.forkserver", str(self.forkserver_socket),
                                   "--project", str(PROJECT)])

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

    # -- processes ------------------------------------------------------------------------------
    def node_home(self, i: int) -> Path:
        """SuperNode ``i``'s own ``FLWR_HOME``: as on separate machines, each node installs the app
        (FAB) into its own folder; Flower's install is not safe for several nodes sharing one."""
        return self.workdir / f"supernode{i}_home"

    def _start(self, name: str, cmd: list[str], home: Path | None = None) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 (held by the process, closed in close())
        self.logs_open.append(log)
        env = self.env if home is None else {**self.env, "FLWR_HOME": str(home)}
        proc = subprocess.Popen(cmd, cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: stopping it stops its children
        proc.log = log  # type: ignore[attr-defined]
        self.procs[name] = proc
        return proc

    def superlink_command(self) -> list[str]:
        """The SuperLink's command line (also what ``docker/compose.yaml`` runs, with container paths)."""
        cmd = [_bin("flower-superlink"), "--host", HOST, "--port", str(self.port), "--database",
               str(self.workdir / "state.db"), "--disable-runtime-dependency-installation"]
        if self.insecure:
            return cmd + ["--insecure"]
        return cmd + ["--ssl-ca-certfile", str(self.certs["ca"]), "--ssl-certfile", str(self.certs["cert"]),
                      "--ssl-keyfile", str(self.certs["key"]), "--enable-supernode-auth"]

    def start_superlink(self) -> None:
        wait_for_port(self.port, self.startup_timeout, self._start("superlink", self.superlink_command()),
                      "flower-superlink")

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
        cmd = [_bin("flower-supernode"), "--superlink", f"{HOST}:{self.port}", "--host", HOST, "--port",
               str(port or free_port()), "--node-config", f"partition-id={i} num-partitions={n}", "--max-retries", "5"]
        if self.insecure:
            return cmd + ["--insecure"]
        return cmd + ["--root-certificates", str(self.certs["ca"]), "--auth-supernode-private-key", str(self.keys[i][0])]

    def start_supernode(self, i: int, num_partitions: int | None = None) -> subprocess.Popen:
        """Start SuperNode ``i`` (shard ``partition-id=i``)."""
        home = self.node_home(i)
        home.mkdir(exist_ok=True)
        return self._start(f"supernode{i}", self.supernode_command(i, num_partitions), home)

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        """Stop one process and its process group (its ClientApp/ServerApp children), whatever fails:
        SIGTERM, then SIGKILL; a process that still cannot be reaped is left to the OS, never to
        stop the rest of the clean-up. Its log file is closed."""
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        try:
            _terminate(proc, sig, timeout)
        finally:
            log = getattr(proc, "log", None)
            if log is not None:
                log.close()

    def __enter__(self) -> LocalFederation:
        try:
            if self.warm_apps:
                self.start_forkserver()  # its imports overlap the SuperLink's start
            self.start_superlink()
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
        """Stop every process of this federation (``flwr run`` processes, nodes, then the SuperLink)
        and any stray one Flower detached (SuperExec); close every log. One failure stops nothing else."""
        try:
            for run in self.runs:
                _terminate(run, signal.SIGTERM, 10.0, group=False)
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

    def _stop_strays(self) -> None:
        """Kill leftover processes started under this federation's ``FLWR_HOME`` (Linux ``/proc``).

        Flower starts SuperExec and app processes in their own sessions; one whose parent died
        (a refused SuperNode) would outlive the federation. Every home (the SuperLink's and each
        node's) is checked.
        """
        homes = [self.home] + [self.node_home(i) for i in range(self.num_nodes)]
        markers = [f"FLWR_HOME={h}".encode() + b"\0" for h in homes]
        for env in Path("/proc").glob("[0-9]*/environ"):
            try:
                data = env.read_bytes()
                if any(m in data for m in markers) and int(env.parent.name) != os.getpid():
                    os.kill(int(env.parent.name), signal.SIGKILL)
            except (OSError, ValueError):
                continue

    def __exit__(self, *exc) -> None:
        self.close()

    # -- flwr CLI -------------------------------------------------------------------------------
    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run the ``flwr`` CLI against this federation; raise with its output on failure."""
        res = subprocess.run([_bin("flwr"), *args], cwd=PROJECT, env=self.env, capture_output=True, text=True,
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
        tails = {}
        for log in sorted(self.workdir.glob("*.log")):
            text = log.read_bytes()[-chars:].decode("utf-8", "replace")
            tails[log.stem] = text
        return tails

    def start_run(self, run_config: dict) -> subprocess.Popen:
        """Start ``flwr run ... --stream`` without waiting (its output: the ServerApp's log). The caller
        reads its output (``communicate``); :meth:`close` stops it if it is still running.

        The app is run from a staged copy of its FAB's files (:func:`stage_app`): ``flwr run`` walks
        every file under the folder it is given before it filters them, and the project folder holds
        the virtual environment (~80,000 files, 11 s a run on 2 cores)."""
        cfg = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        app = stage_app(self.workdir / "app")
        proc = subprocess.Popen([_bin("flwr"), "run", str(app), "fedser", "--run-config", cfg, "--stream"],
                                cwd=PROJECT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.runs.append(proc)
        return proc


def deploy(cfg) -> dict:
    """Prepare the data, run it on a local SuperLink + SuperNodes, and report seconds per round.

    With ``deploy.compare_simulation`` the same settings also run in Flower's simulation engine,
    so the report gives the deployment (HTTPS) vs simulation for the same configuration.
    """
    d = cfg.deploy
    nodes = int(d.nodes)
    if nodes < 1:
        raise ValueError(f"deploy.nodes: must be >= 1, got {nodes}")
    prepared = prepare(cfg, [cfg.dataset.name], int(cfg.fold)).resolve()
    out = Path(cfg.out_dir).resolve()
    report: dict = {"nodes": nodes, "rounds": int(cfg.fl.rounds), "tls": not bool(d.insecure),
                    "supernode_auth": not bool(d.insecure), "warm_apps": bool(d.warm_apps)}
    s = replace(run_settings(cfg, prepared, str(out / "deployment"), str(out / "deployment" / "updates")), min_available=nodes,
                resume=False)
    print(f"[deploy] SuperLink + {nodes} SuperNodes on {HOST} ({'insecure' if d.insecure else 'TLS + node auth'}), "
          f"{s.rounds} rounds -> {out / 'deployment'}", flush=True)
    t0 = time.perf_counter()
    with LocalFederation(Path(d.workdir).resolve(), nodes, insecure=bool(d.insecure),
                         startup_timeout=float(d.startup_timeout), warm_apps=bool(d.warm_apps)) as fed:
        report["startup_seconds"] = time.perf_counter() - t0
        res = fed.run(s.to_run_config(), timeout=float(d.run_timeout))
        print(res.stdout[-2000:], flush=True)
    dep = json.loads((out / "deployment" / "results.json").read_text())
    privacy = dep.get("privacy") or {}
    report["deployment"] = {"wall_seconds": dep["wall_seconds"], "discover_seconds": dep.get("discover_seconds"),
                            "seconds_per_round": seconds_per_round(dep),
                            "final": dep["final"], "short_rounds": dep.get("short_rounds"),
                            "recorded_updates": dep.get("recorder", {}).get("updates"), "secagg": s.secagg,
                            "privacy": {k: privacy.get(k) for k in ("mode", "spent_epsilon_max", "delta", "epsilon_server",
                                                                    "guarantee")} if privacy else None}
    if d.compare_simulation:
        from fed_ser.flower.simulation import simulate  # Flower's simulation engine (and Ray) load only for the comparison

        sim = replace(s, out_dir=str(out / "simulation"), recorder_dir=str(out / "simulation" / "updates"))
        simulate(sim, nodes, cpus_per_client=float(cfg.simulation.cpus_per_client))
        res_sim = json.loads((out / "simulation" / "results.json").read_text())
        report["simulation"] = {"wall_seconds": res_sim["wall_seconds"], "discover_seconds": res_sim.get("discover_seconds"),
                                "seconds_per_round": seconds_per_round(res_sim),
                                "final": res_sim["final"]}
        report["deployment_vs_simulation"] = report["deployment"]["seconds_per_round"] / report["simulation"]["seconds_per_round"]
    atomic_write_json(out / "deploy.json", report)
    transport = "an unencrypted connection (deploy.insecure=true: no TLS, no node authentication)" if d.insecure else "HTTPS"
    line = (f"[deploy] {report['deployment']['seconds_per_round']:.2f} s/round over {transport} "
            f"(after {report['deployment']['discover_seconds'] or 0:.1f} s for the nodes' first replies)") + (" with SecAgg+" if s.secagg else "")
    if privacy:
        line += f", {privacy['mode']}: epsilon {privacy['spent_epsilon_max']:.2f} at delta {privacy['delta']}"
    if "simulation" in report:
        line += (f", {report['simulation']['seconds_per_round']:.2f} s/round in simulation "
                 f"({report['deployment_vs_simulation']:.1f}x)")
    print(line + f"; report: {out / 'deploy.json'}", flush=True)
    return report


def main(argv: list[str] | None = None) -> None:
    """Console script ``fed-ser-deploy deploy.nodes=3 fl.rounds=5 [deploy.insecure=true]`` (conf/deploy.yaml)."""
    deploy(load_config(list(sys.argv[1:] if argv is None else argv), "deploy"))


def setup_main(argv: list[str] | None = None) -> None:
    """Console script ``fed-ser-deploy-setup``: what the docker-compose demo puts in its volumes.

    TLS certificates (valid for the SuperLink's service name too), SuperNode keys, the synthetic
    corpus with prepared features, the run config naming that file, and the CLI connection.
    """
    p = argparse.ArgumentParser(prog="fed-ser-deploy-setup", description=setup_main.__doc__)
    p.add_argument("--certs", type=Path, required=True)
    p.add_argument("--keys", type=Path, required=True)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--flwr-home", type=Path, required=True)
    p.add_argument("--superlink", default="superlink:8000")
    p.add_argument("overrides", nargs="*", help="Hydra overrides of conf/deploy.yaml")
    a = p.parse_args(argv)
    certs = make_certificates(a.certs, hostnames=(a.superlink.split(":")[0],))
    make_node_keys(a.keys, a.nodes)
    cfg = load_config([f"data.root={a.data}/corpora", f"data.cache={a.data}/cache", f"data.prepared_dir={a.data}/prepared",
                       f"out_dir={a.data}/run", *a.overrides], "deploy")
    prepared = prepare(cfg, [cfg.dataset.name], int(cfg.fold))
    s = run_settings(cfg, prepared, str(a.data / "run"), str(a.data / "run" / "updates"))
    flat = {**s.to_run_config(), "fl.min_available": a.nodes}
    (a.data / "run-config.txt").write_text(" ".join(f"{k}={json.dumps(v)}" for k, v in flat.items()) + "\n")
    write_connection(a.flwr_home, a.superlink, certs["ca"])
    print(f"[deploy] certificates {a.certs}, {a.nodes} node keys {a.keys}, data {prepared}, run config {a.data / 'run-config.txt'}")


if __name__ == "__main__":
    main()
