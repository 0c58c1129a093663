"""What a deployed round waits on, taken out of the way: the ServerApp's reply polling (PromptGrid)
and the ClientApp fork server with its launcher (each message's process forked warm, not started cold)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.app import Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import fed_ser.flower.grid as grid_module
from fed_ser.deployment.federation import LAUNCHER, PROJECT
from fed_ser.deployment.warm_apps.launcher import SERVER_ENV
from fed_ser.flower.grid import PromptGrid

TESTS = Path(__file__).resolve().parent


# -- PromptGrid ----------------------------------------------------------------------------------
class Clock:
    """time.monotonic and time.sleep of a fake clock: sleeping advances it, and the sleeps are kept."""

    def __init__(self) -> None:
        self.now, self.sleeps = 0.0, []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class SlowGrid:
    """A grid whose reply to message ``i`` appears at the ``ready[i]``-th pull (``None``: never)."""

    def __init__(self, ready: list[int | None]) -> None:
        self.ready, self.pulls, self.sent = ready, 0, []

    def push_messages(self, messages):
        self.sent = list(messages)
        for m in self.sent:  # what Flower's grids do on push: a message's id is its object id
            m.metadata.__dict__["_message_id"] = m.object_id
        return [m.metadata.message_id for m in self.sent]

    def pull_messages(self, message_ids):
        self.pulls += 1
        wanted = set(message_ids)
        return [Message(RecordDict({"m": MetricRecord({"i": i})}), reply_to=m)
                for i, m in enumerate(self.sent) if self.ready[i] == self.pulls and m.metadata.message_id in wanted]

    def get_node_ids(self):
        return [7, 8]


@pytest.fixture
def clock(monkeypatch) -> Clock:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    c = Clock()
    monkeypatch.setattr(grid_module, "time", c)
    return c


def _messages(n: int) -> list[Message]:
    return [Message(RecordDict({"m": MetricRecord({"q": i})}), dst_node_id=10 + i, message_type="query") for i in range(n)]


def test_prompt_grid_pulls_every_poll_interval_until_every_reply_is_in(clock):
    inner = SlowGrid([1, 4, 2])
    replies = PromptGrid(inner, 0.05).send_and_receive(_messages(3), timeout=60.0)
    assert sorted(r.content.metric_records["m"]["i"] for r in replies) == [0, 1, 2]
    assert inner.pulls == 4 and clock.sleeps == [0.05] * 3  # Flower's deployed grid sleeps 3 s between pulls


def test_prompt_grid_gives_up_at_the_timeout_with_the_replies_it_has(clock):
    inner = SlowGrid([1, None])  # a dead node never replies
    replies = PromptGrid(inner, 0.3).send_and_receive(_messages(2), timeout=1.0)
    assert [r.content.metric_records["m"]["i"] for r in replies] == [0]
    assert clock.now == pytest.approx(1.0) and clock.sleeps[-1] == pytest.approx(0.1)  # never sleeps past the deadline
    assert PromptGrid(inner, 0.3).get_node_ids() == [7, 8]  # everything else is the wrapped grid's


def test_prompt_grid_without_a_timeout_waits_for_every_reply_and_with_none_left_pulls_nothing(clock):
    inner = SlowGrid([30, 2])
    assert len(PromptGrid(inner, 0.05).send_and_receive(_messages(2))) == 2 and inner.pulls == 30
    inner = SlowGrid([1])
    assert PromptGrid(inner, 0.05).send_and_receive(_messages(1), timeout=0.0) == [] and inner.pulls == 0  # as Flower's


def test_prompt_grid_rejects_a_non_positive_interval():
    with pytest.raises(ValueError, match="fl.poll_interval"):
        PromptGrid(SlowGrid([]), 0.0)


# -- the ClientApp fork server and its launcher -------------------------------------------------------
@pytest.fixture(scope="module")
def forkserver(tmp_path_factory):
    """A fork server whose children run tests/forkserver_entry.py:report instead of Flower's flwr-clientapp."""
    folder = Path(tmp_path_factory.mktemp("fs", numbered=True))
    sock, log = folder / "s.sock", folder / "server.log"
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{PROJECT}"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fed_ser.deployment.warm_apps.forkserver", str(sock), "--project", str(PROJECT),
                                 "--entry", "flwr-clientapp=forkserver_entry:report"], env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not sock.exists():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the fork server did not start"
        time.sleep(0.1)
    yield proc, sock, log
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode == 0 and not sock.exists(), log.read_text()  # stops cleanly and removes its socket


def _launch(sock: Path | str, args: list[str], cwd: Path, command: str = "flwr-clientapp") -> subprocess.Popen:
    """The launcher as a SuperExec runs it; the real ``command`` (run where nothing is forked) says "cold"."""
    real = cwd / "real" / command
    real.parent.mkdir(exist_ok=True)
    real.write_text('#!/bin/sh\necho cold "$@"\n')
    real.chmod(0o755)
    env = {**os.environ, SERVER_ENV: str(sock), "FED_SER_TEST_MARK": "node-7"}
    return subprocess.Popen([sys.executable, "-I", "-S", str(LAUNCHER), str(real), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_forked_clientapp_process_is_the_launchers_with_the_libraries_warm(forkserver, tmp_path):
    proc, sock, _ = forkserver
    p = _launch(sock, ["--token", "abc", "--code", "3"], tmp_path)
    out, err = p.communicate(timeout=60)
    seen = json.loads(out)
    assert p.returncode == 3 and err.strip() == "to stderr"  # its exit code and both streams are the launcher's
    assert seen["argv"] == [str(tmp_path / "real" / "flwr-clientapp"), "--token", "abc", "--code", "3"]
    assert seen["cwd"] == str(tmp_path) and seen["mark"] == "node-7"  # the launcher's directory and environment
    assert seen["ppid"] == proc.pid  # forked by the server, not started by the launcher
    assert seen["torch"] and seen["own"] == []  # torch warm; the app's own modules left to the FAB


def test_forked_processes_draw_their_own_random_numbers(forkserver, tmp_path):
    """Flower's LocalDpMod draws its noise from numpy's global generator: two forked ClientApp processes
    must not draw the same noise, as two fresh processes would not."""
    _, sock, _ = forkserver
    seen = [json.loads(_launch(sock, [], tmp_path).communicate(timeout=60)[0]) for _ in range(2)]
    assert seen[0]["np_random"] != seen[1]["np_random"] and seen[0]["torch_random"] != seen[1]["torch_random"]


def test_a_signal_to_the_launcher_reaches_the_clientapp_process(forkserver, tmp_path):
    _, sock, _ = forkserver
    p = _launch(sock, ["--sleep", "120"], tmp_path)
    child = json.loads(p.stdout.readline())["pid"]
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=30)
    assert p.returncode == -signal.SIGTERM  # it dies as the ClientApp process did
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{child}").exists()


def test_without_a_fork_server_the_launcher_runs_the_real_command(tmp_path):
    p = _launch(tmp_path / "no-such.sock", ["--token", "abc"], tmp_path)
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 0 and out.strip() == "cold --token abc"


def test_a_command_the_server_does_not_fork_runs_for_real(forkserver, tmp_path):
    _, sock, log = forkserver
    p = _launch(sock, ["--x"], tmp_path, command="flwr-supernode")
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 0 and out.strip() == "cold --x"
    assert "flwr-supernode as pid" not in log.read_text()  # the server answered: not mine to fork


def test_a_server_that_hangs_up_before_forking_leaves_the_launcher_to_run_the_real_command(tmp_path):
    import socket

    sock = tmp_path / "rude.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock))
    server.listen(1)
    p = _launch(sock, ["--y"], tmp_path)
    conn, _ = server.accept()
    conn.close()  # no pid, no fork
    out, _ = p.communicate(timeout=30)
    server.close()
    assert p.returncode == 0 and out.strip() == "cold --y"


def _quick_server(tmp_path: Path, sock: Path, *args: str) -> subprocess.Popen:
    """A fork server of a project with nothing heavy to preload (its only app module is the test entry)."""
    project = tmp_path / "project"
    project.mkdir(exist_ok=True)
    (project / "pyproject.toml").write_text('[tool.flwr.app.components]\nclientapp = "forkserver_entry:report"\n')
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{PROJECT}"}
    return subprocess.Popen([sys.executable, "-m", "fed_ser.deployment.warm_apps.forkserver", str(sock), "--project", str(project),
                             "--entry", "flwr-clientapp=forkserver_entry:report", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(proc: subprocess.Popen) -> str:
    """The server's first line, once it listens."""
    line = proc.stdout.readline()
    assert "fork server for" in line, line + proc.communicate(timeout=30)[0]
    return line


def test_the_fork_server_socket_is_private_from_its_birth(forkserver):
    import stat

    _, sock, _ = forkserver
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600 and stat.S_ISSOCK(sock.stat().st_mode)


def test_the_fork_server_refuses_a_path_that_is_not_its_own_socket(tmp_path):
    precious = tmp_path / "notes.txt"
    precious.write_text("keep me")
    proc = _quick_server(tmp_path, precious)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "is not a socket of this user" in out
    assert precious.read_text() == "keep me"  # never deleted


def test_the_fork_server_replaces_a_stale_socket_of_its_own_and_removes_it_on_sighup(tmp_path):
    import socket

    sock = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()  # bound, never listened: nobody answers there
    proc = _quick_server(tmp_path, sock)
    _wait_for(proc)
    p = _launch(sock, ["--code", "0"], tmp_path)
    assert p.communicate(timeout=60)[1].strip() == "to stderr" and p.returncode == 0  # forked, not run cold
    proc.send_signal(signal.SIGHUP)  # stops as on SIGTERM
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and not sock.exists(), out


def test_a_launcher_of_another_user_is_refused(tmp_path):
    """SO_PEERCRED: the server serves one user's launchers (here it is told another uid, so ours is a stranger);
    the refused launcher runs the real command itself, with nothing forked by the server."""
    sock = tmp_path / "s.sock"
    proc = _quick_server(tmp_path, sock, "--uid", str(os.getuid() + 1))
    _wait_for(proc)
    p = _launch(sock, ["--z"], tmp_path)
    out, _ = p.communicate(timeout=30)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=30)
    assert p.returncode == 0 and out.strip() == "cold --z"
    assert f"refused a connection from pid {p.pid}, uid {os.getuid()}" in log and "as pid" not in log
