"""fl-sim's SuperNode launcher (``fl_sim.supernode``) and warm SuperExec (``fl_sim.superexec``), piece by piece.

The whole path (TLS SuperLink, two SuperNodes started by ``deploy/supernode.sh``, results equal to the
simulation's) runs in ``tests/test_deploy.py``; two hosts and a SuperNode crash in ``tests/test_deploy_netns.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.supercore.constant import TaskType
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError, pull_objects
from flwr.supercore.superexec.executor.types import ExecutionSpec, LaunchResultStatus

from fl_sim import superexec, supernode

ROOT = Path(__file__).resolve().parents[1]


def _spec(task_type=TaskType.CLIENT_APP, **kw) -> ExecutionSpec:
    args = dict(task_type=task_type, runtime_api_address="127.0.0.1:1", token="tok", insecure=True,
                root_certificates_path=None, runtime_dependency_install=False, parent_pid=os.getpid(),
                suppress_output=False, task_id=7)
    return ExecutionSpec(**{**args, **kw})


@pytest.mark.parametrize("raw, expected", [(None, 0.1), ("", 0.1), ("0.5", 0.5), ("3", 3.0)])
def test_poll_interval_reads_the_variable(monkeypatch, raw, expected):
    if raw is None:
        monkeypatch.delenv(supernode.IDLE_POLL_ENV, raising=False)
    else:
        monkeypatch.setenv(supernode.IDLE_POLL_ENV, raw)
    assert supernode.poll_interval(supernode.IDLE_POLL_ENV, 0.1) == expected


@pytest.mark.parametrize("raw", ["abc", "0", "0.001", "61", "inf", "nan", "-1"])
def test_poll_interval_refuses_values_outside_the_range(monkeypatch, raw):
    monkeypatch.setenv(supernode.REPLY_POLL_ENV, raw)
    with pytest.raises(ValueError) as e:
        supernode.poll_interval(supernode.REPLY_POLL_ENV, 0.02)
    assert supernode.REPLY_POLL_ENV in str(e.value) and repr(raw) in str(e.value) and "[0.01, 60.0]" in str(e.value)


def test_supernode_with_a_bad_interval_exits_2_with_one_line_before_starting():
    env = {**os.environ, supernode.IDLE_POLL_ENV: "soon"}
    p = subprocess.run([sys.executable, "-m", "fl_sim.supernode", "--insecure", "--superlink", "127.0.0.1:1"],
                       env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "FL_SIM_NODE_POLL_S='soon' is not allowed" in lines[0]


def test_superexec_refuses_another_executor():
    p = subprocess.run([sys.executable, "-m", "fl_sim.superexec", "--executor", "kubernetes"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 2 and "--executor is not allowed" in p.stderr


def test_node_sleeps_shortens_the_idle_pull_and_the_reply_wait(monkeypatch):
    slept = []
    monkeypatch.setattr(supernode.time, "sleep", slept.append)
    s = supernode.NodeSleeps(idle_s=0.1, reply_s=0.02)
    s.sleep(3)      # Flower's idle pull interval
    s.sleep(0.5)    # Flower's reply-wait step
    s.sleep(0.01)   # anything shorter than the step is kept
    assert slept == [0.1, 0.02, 0.01]
    assert s.monotonic is supernode.time.monotonic  # the rest is the time module


def test_superexec_command_is_rewritten_and_others_are_not():
    cmd = ["flower-superexec", "--insecure", "--runtime-api-address", "127.0.0.1:9094", "--parent-pid", "12"]
    assert supernode.WarmSuperExecLauncher.command(cmd) == [sys.executable, "-m", "fl_sim.superexec", *cmd[1:]]
    assert supernode.WarmSuperExecLauncher.command(["/usr/bin/flower-superexec", "-x"])[:3] == [
        sys.executable, "-m", "fl_sim.superexec"]
    assert supernode.WarmSuperExecLauncher.command(["flwr-clientapp", "--token", "t"]) == [
        "flwr-clientapp", "--token", "t"]


def test_shorter_backoff_sets_the_first_delay_once_and_still_retries():
    wrapped = supernode.shorter_backoff(pull_objects)
    assert wrapped.keywords == {"initial_backoff": supernode.OBJECT_PULL_BACKOFF_S}
    assert supernode.shorter_backoff(wrapped) is wrapped
    tries = {"a": 0, "b": 0}

    def pull(obj_id: str) -> bytes:
        tries[obj_id] += 1
        if tries[obj_id] < 3:
            raise ObjectUnavailableError(obj_id)
        return obj_id.encode()

    assert wrapped(["a", "b"], pull) == {"a": b"a", "b": b"b"}
    assert tries == {"a": 3, "b": 3}


def test_checkout_modules_are_this_checkouts_and_not_the_environments():
    import numpy  # noqa: F401 - in the virtual environment, which may lie inside the checkout
    import torch  # noqa: F401

    names = superexec.checkout_modules()
    assert "fl_sim.superexec" in names and "fl_sim.supernode" in names
    assert not {"numpy", "torch", "flwr"} & set(names)
    assert all(not n.startswith(("numpy.", "torch.", "flwr.")) for n in names)


def _fab(tag: bytes) -> bytes:
    return b"PK-fake-fab-" + tag


def test_install_once_extracts_a_fab_once_per_full_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    calls = []

    def install(fab_file, install_dir=None, skip_prompt=False):
        digest = hashlib.sha256(fab_file).hexdigest()
        calls.append(digest)
        path = tmp_path / "apps" / f"pub.app.1.0.0.{digest[:8]}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    once = superexec.install_once(install)
    first = once(_fab(b"1"), skip_prompt=True)
    assert once(_fab(b"1"), skip_prompt=True) == first and len(calls) == 1
    assert (first / superexec.INSTALLED_MARKER).read_text() == hashlib.sha256(_fab(b"1")).hexdigest()
    other = once(_fab(b"2"), skip_prompt=True)
    assert other != first and len(calls) == 2
    # a folder with the same 8-digit prefix but another full hash is not taken for this FAB
    (first / superexec.INSTALLED_MARKER).write_text("0" * 64)
    assert once(_fab(b"1"), skip_prompt=True) == first and len(calls) == 3
    # Flower's interactive path and FAB files on disk are not cached
    once(_fab(b"1"), skip_prompt=False)
    assert len(calls) == 4


def test_fork_executor_refuses_other_task_types():
    result = superexec.ForkExecutor().launch(_spec(TaskType.SERVER_APP))
    assert result.status == LaunchResultStatus.FAILED and "flwr-clientapp" in result.message


@pytest.mark.parametrize("outcome, code", [("ok", 0), ("exit1", 1), ("raise", 1)])
def test_fork_executor_runs_flowers_run_clientapp_in_a_child(tmp_path, monkeypatch, outcome, code):
    import flwr.supernode.runtime.run_clientapp as rc
    from flwr.supercore.exit import exit_handler, flwr_exit

    report = tmp_path / "child.json"
    exit_handler.add_exit_handler(lambda: report.with_suffix(".parent-handler").write_text("ran"))

    def fake_run_clientapp(**kw):
        report.write_text(json.dumps({
            "pid": os.getpid(), "kw": {k: kw[k] for k in ("runtime_api_address", "token", "insecure", "parent_pid")},
            "checkout_modules": superexec.checkout_modules(), "handlers": len(exit_handler.registered_exit_handlers)}))
        if outcome == "raise":
            raise RuntimeError("boom")
        flwr_exit(0 if outcome == "ok" else 300)  # run_clientapp ends like this: sys.exit(0) or sys.exit(1)

    monkeypatch.setattr(rc, "run_clientapp", fake_run_clientapp)
    ex = superexec.ForkExecutor()
    try:
        assert ex.launch(_spec()).status == LaunchResultStatus.ACCEPTED
        (pid,) = ex.children
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == code
        got = json.loads(report.read_text())
        assert got["pid"] == pid != os.getpid()
        assert got["kw"] == {"runtime_api_address": "127.0.0.1:1", "token": "tok", "insecure": True,
                             "parent_pid": os.getpid()}
        assert got["checkout_modules"] == [] and got["handlers"] == 0
        assert not report.with_suffix(".parent-handler").exists()  # the SuperExec's handlers stay the parent's
        ex.reconcile()
        assert ex.children == set()
    finally:
        exit_handler.registered_exit_handlers.pop()
        ex.close()
