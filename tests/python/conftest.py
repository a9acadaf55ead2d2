"""Session fixture: one real rpx cluster (ipcluster start -n 4 --daemonize) in a private RPX_DIR,
driven by the real Python `ipyparallel.Client`.

Teardown runs `ipcluster stop`, then SIGKILLs whatever is left of the cluster: the pids named in
cluster.json and every process carrying this session's RPX_DIR in its environment (so nothing of
ours outlives the run, and nothing of anybody else's is touched). What had to be killed is reported
in the terminal summary, since `ipcluster stop` should leave no orphans.
"""

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import ipyparallel
import pytest

import rpx_helpers as H

note = H.note

@dataclass
class Cluster:
    rpx_dir: Path
    profile_dir: Path
    client_file: Path
    engine_file: Path
    cluster_file: Path
    env: dict
    rc: ipyparallel.Client
    rust_ids: list
    ipython_dir: Path
    started_pids: set = field(default_factory=set)

    def ipcluster(self, *args, timeout=120):
        return subprocess.run([str(H.RELEASE / "ipcluster"), *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def cluster_pids(self):
        return H.pids_in(H.read_json(self.cluster_file) or {})

    def log_tail(self, n=40):
        return H.log_tail(self.profile_dir, n)

    def live_rust_ids(self):
        ids = set(self.rc.ids)
        return [i for i in self.rust_ids if i in ids]


@pytest.fixture(scope="session")
def cluster():
    missing = H.missing_binaries()
    if missing:
        pytest.fail(f"{', '.join(missing)} missing in {H.RELEASE}: run cargo build --release first",
                    pytrace=False)
    rpx_dir = Path(tempfile.mkdtemp(prefix="rpx-pytest-"))
    ipython_dir = rpx_dir / "ipython"
    ipython_dir.mkdir()
    env = dict(os.environ)
    env.update(RPX_DIR=str(rpx_dir), IPYTHONDIR=str(ipython_dir), RUST_BACKTRACE="0")
    env.pop("RPX_PROFILE", None)
    os.environ["IPYTHONDIR"] = str(ipython_dir)  # the client side too: nothing goes to $HOME
    profile_dir = rpx_dir / "profile_default"
    sec = profile_dir / "security"
    c = Cluster(rpx_dir=rpx_dir, profile_dir=profile_dir, client_file=sec / "ipcontroller-client.json",
                engine_file=sec / "ipcontroller-engine.json", cluster_file=sec / "cluster.json", env=env,
                rc=None, rust_ids=[], ipython_dir=ipython_dir)
    rc = None
    try:
        t0 = time.monotonic()
        try:
            r = c.ipcluster("start", "-n", "4", "--daemonize", timeout=180)
        except subprocess.TimeoutExpired:
            pytest.fail("`ipcluster start -n 4 --daemonize` did not return within 180 s\n" + c.log_tail(),
                        pytrace=False)
        note("ipcluster start -n 4 --daemonize", f"exit {r.returncode} after {time.monotonic() - t0:.2f} s")
        if r.returncode != 0:
            pytest.fail(f"`ipcluster start -n 4 --daemonize` exited {r.returncode}\nstdout: {r.stdout}\n"
                        f"stderr: {r.stderr}\n{c.log_tail()}", pytrace=False)
        c.started_pids = c.cluster_pids()
        H.wait_until(c.client_file.exists, 30, what=str(c.client_file))
        rc = ipyparallel.Client(str(c.client_file), timeout=30)  # positional: url_file= is ignored by 9.2
        rc.wait_for_engines(4, timeout=60)
        c.rc = rc
        c.rust_ids = sorted(rc.ids)
        note("rust engines", f"ids {c.rust_ids}, cluster pids {sorted(c.started_pids)}")
        yield c
    finally:
        if rc is not None:
            try:
                rc.close()
            except Exception as e:  # noqa: BLE001
                note("teardown", f"rc.close() raised {e!r}")
        pids = c.started_pids | c.cluster_pids()
        try:
            r = c.ipcluster("stop", timeout=60)
            note("ipcluster stop", f"exit {r.returncode} {r.stdout.strip()[-300:]} {r.stderr.strip()[-300:]}")
        except subprocess.TimeoutExpired:
            note("ipcluster stop", "did not return within 60 s")
        # give a clean stop a moment, then kill what is left
        try:
            H.wait_until(lambda: not H.procs_with_env("RPX_DIR", str(rpx_dir)), 10, what="cluster exit")
        except TimeoutError:
            pass
        killed = H.sweep(rpx_dir, pids)
        if killed:
            note("processes left after `ipcluster stop` (SIGKILLed)", "\n".join(killed))
        if os.environ.get("RPX_TEST_KEEP_DIR"):
            note("RPX_DIR kept", rpx_dir)
        else:
            shutil.rmtree(rpx_dir, ignore_errors=True)


@pytest.fixture
def rc(cluster):
    return cluster.rc


@pytest.fixture
def python_engine(cluster):
    """Start Python ipyparallel engines against the rpx controller; kill them (and their nannies) after."""
    started = []

    def start(timeout=90):
        before = set(cluster.rc.ids)
        log = tempfile.NamedTemporaryFile(prefix="pyengine-", suffix=".log", dir=cluster.rpx_dir, delete=False)
        proc = subprocess.Popen(
            [H.VENV_PYTHON, "-m", "ipyparallel.engine", f"--file={cluster.engine_file}", "--timeout=30"],
            stdout=log, stderr=subprocess.STDOUT, env=cluster.env, start_new_session=True)
        started.append((proc, log, before))
        try:
            new = H.wait_until(lambda: sorted(set(cluster.rc.ids) - before), timeout,
                               what="a Python engine to appear in rc.ids")
        except TimeoutError as e:
            log.flush()
            text = Path(log.name).read_text(errors="replace")[-4000:]
            raise AssertionError(f"Python engine did not register within {timeout} s ({e}); "
                                 f"alive={proc.poll() is None}\n--- engine log\n{text}\n{cluster.log_tail(15)}")
        assert len(new) == 1, f"expected one new engine id, got {new}"
        started[-1] = (proc, log, new[0])
        return new[0], proc

    yield start
    for proc, log, eid in started:
        H.kill_tree(proc)
        log.close()
        if isinstance(eid, int):
            try:
                H.wait_until(lambda: eid not in cluster.rc.ids, 30)
            except TimeoutError:
                note("python engine teardown", f"engine {eid} (pid {proc.pid}) killed but still in rc.ids after 30 s")


def pytest_terminal_summary(terminalreporter):
    if not H.NOTES:
        return
    terminalreporter.section("rpx interop notes")
    for title, text in H.NOTES:
        terminalreporter.write_line(f"{title}: {text}")
