"""Fixtures for the kernel tests (test_k_*.py): the `rpx` kernelspec, a cluster of the kernel
tests' own, and real Jupyter kernels started through jupyter_client, run cell by cell.

Use it from a test module with

    pytest_plugins = ["kernel_fixtures"]

(registered once however many modules name it, so session fixtures stay one per session).

Fixtures
- `jupyter_env` (session): runs `target/release/rpx-kernel install --no-prepare --prefix <tmp>`
  (test_k_prepare tests the prepare; kernels get RPX_KERNEL_PREPARE=0 for the same reason) and points
  this process at private Jupyter dirs: `JUPYTER_PATH=<tmp>/share/jupyter` (the rpx kernelspec,
  first on the path), `JUPYTER_DATA_DIR` / `JUPYTER_RUNTIME_DIR` / `JUPYTER_CONFIG_DIR` /
  `IPYTHONDIR` under <tmp> (nothing is read from or written to $HOME, and a stale user-installed
  `rpx` kernelspec cannot shadow ours). Restored at teardown. Value: a `JupyterEnv`.
- `kernel_cluster` (session): its own `ipcluster start -n 4 --daemonize` in a private RPX_DIR
  (4 engines, registered before the fixture returns); `kernel_cluster.env` is the environment
  for everything that should find it (RPX_DIR, RPX_PROFILE=default, the Jupyter dirs). Teardown:
  shut down kernels, `ipcluster stop`, then SIGKILL whatever still carries this RPX_DIR in its
  environment (cluster processes, kernels, their evcxr children), reported in the summary.
- `no_cluster_env` (session): the same environment with an RPX_DIR where no cluster runs (for
  tests of what %px says when there is nothing to talk to).
- `rpx_kernel` (module): one `rpx` kernel on `kernel_cluster`, shared by a module's tests
  (starting a kernel costs an evcxr warm-up, ~10 s, and the first %px compiles).
- `rpx_kernel_no_cluster` (module): one `rpx` kernel whose RPX_DIR has no cluster.
- `start_kernel` (function): a factory `start_kernel(env=None, kernel_name="rpx") -> Kernel`
  (env defaults to `kernel_cluster.env`); every kernel it started is shut down after the test.

`Kernel.run(code, timeout=...)` executes one cell and returns a `Cell`: the `execute_reply`
content, every iopub message of that cell in order (stream, display_data, update_display_data,
execute_result, error, clear_output), and views of them: `stdout`, `stderr`, `outputs` (what a
notebook would show, display updates applied), `text` (all of it as plain text, ANSI colours
stripped), `errors`, `status`. It waits for both the reply and the cell's `status: idle`, so
every output has arrived, and raises `CellTimeout` (with the kernel's stderr tail) when either
is late. `Kernel.request(...)` covers the other shell requests (complete, inspect, is_complete,
history). Timeouts: `FIRST_CELL_TIMEOUT` for a kernel's first cell (evcxr warms up),
`PX_FIRST_TIMEOUT` for a first %px (a cold compiler), `CELL_TIMEOUT` otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty

import pytest

import rpx_helpers as H

note = H.note

KERNEL_BINARY = H.RELEASE / "rpx-kernel"
KERNEL_NAME = "rpx"

KERNEL_STARTUP_TIMEOUT = 90  # kernel_info answered
FIRST_CELL_TIMEOUT = 180  # evcxr warms up (~10 s alone; much more on a loaded 2-core machine)
PX_FIRST_TIMEOUT = 300  # the first %px of a cluster: the compiler's context may still be cold
CELL_TIMEOUT = 120
SHELL_TIMEOUT = 30  # complete / inspect / is_complete / history

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def strip_ansi(s):
    return ANSI.sub("", s)


# ---------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------

JUPYTER_VARS = ("JUPYTER_PATH", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "JUPYTER_CONFIG_DIR",
                "IPYTHONDIR", "JUPYTER_PLATFORM_DIRS")


@dataclass
class JupyterEnv:
    root: Path  # the temp dir holding everything below
    jupyter_path: Path  # <root>/share/jupyter, with kernels/rpx/kernel.json
    kernelspec: dict  # the installed kernel.json
    vars: dict  # the Jupyter variables this session sets

    def kernel_env(self, rpx_dir, profile="default", **extra):
        """An environment for a kernel (or a Jupyter server) whose cluster is in rpx_dir."""
        env = dict(os.environ)
        env.update(self.vars)
        # No background `rpx-kernel prepare` (minutes of CPU) in every test kernel: test_k_prepare
        # turns it back on where it is what is tested.
        env.update(RPX_DIR=str(rpx_dir), RPX_PROFILE=profile, RUST_BACKTRACE="0", RPX_KERNEL_PREPARE="0")
        env.update({k: str(v) for k, v in extra.items()})
        return env


def _install_kernelspec(root):
    if not KERNEL_BINARY.is_file():
        pytest.fail(f"{KERNEL_BINARY} missing: run `cargo build --release --workspace` first "
                    "(the kernel crate builds the `rpx-kernel` binary)", pytrace=False)
    r = subprocess.run([str(KERNEL_BINARY), "install", "--no-prepare", "--prefix", str(root)], capture_output=True,
                       text=True, timeout=60)
    if r.returncode != 0:
        pytest.fail(f"`rpx-kernel install --prefix {root}` exited {r.returncode}\nstdout: {r.stdout}\n"
                    f"stderr: {r.stderr}", pytrace=False)
    spec_file = root / "share" / "jupyter" / "kernels" / KERNEL_NAME / "kernel.json"
    spec = H.read_json(spec_file)
    if spec is None:
        pytest.fail(f"`rpx-kernel install --prefix {root}` exited 0 but wrote no {spec_file}\n"
                    f"stdout: {r.stdout}\nstderr: {r.stderr}", pytrace=False)
    return spec


@pytest.fixture(scope="session")
def jupyter_env():
    root = Path(tempfile.mkdtemp(prefix="rpx-jupyter-"))
    saved = {k: os.environ.get(k) for k in JUPYTER_VARS}
    try:
        spec = _install_kernelspec(root)
        jvars = {
            "JUPYTER_PATH": str(root / "share" / "jupyter"),
            "JUPYTER_DATA_DIR": str(root / "data"),
            "JUPYTER_RUNTIME_DIR": str(root / "runtime"),
            "JUPYTER_CONFIG_DIR": str(root / "config"),
            "IPYTHONDIR": str(root / "ipython"),
            "JUPYTER_PLATFORM_DIRS": "1",
        }
        for d in ("data", "runtime", "config", "ipython"):
            (root / d).mkdir(exist_ok=True)
        os.environ.update(jvars)  # this process too: KernelManager and nbclient find the spec here
        note("rpx kernelspec", f"{root / 'share/jupyter/kernels/rpx'}: argv {spec.get('argv')}")
        yield JupyterEnv(root=root, jupyter_path=root / "share" / "jupyter", kernelspec=spec, vars=jvars)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if not os.environ.get("RPX_TEST_KEEP_DIR"):
            shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# clusters
# ---------------------------------------------------------------------------------------------


@dataclass
class KernelCluster:
    rpx_dir: Path
    profile_dir: Path
    env: dict  # for kernels and servers: RPX_DIR, RPX_PROFILE, Jupyter dirs
    engine_ids: list = field(default_factory=list)
    started_pids: set = field(default_factory=set)

    @property
    def cluster_file(self):
        return self.profile_dir / "security" / "cluster.json"

    @property
    def client_file(self):
        return self.profile_dir / "security" / "ipcontroller-client.json"

    def ipcluster(self, *args, timeout=120):
        return subprocess.run([str(H.RELEASE / "ipcluster"), *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def log_tail(self, n=40):
        return H.log_tail(self.profile_dir, n)


@pytest.fixture(scope="session")
def kernel_cluster(jupyter_env):
    missing = H.missing_binaries()
    if missing:
        pytest.fail(f"{', '.join(missing)} missing in {H.RELEASE}: run cargo build --release first",
                    pytrace=False)
    rpx_dir = Path(tempfile.mkdtemp(prefix="rpx-kernel-cluster-"))
    c = KernelCluster(rpx_dir=rpx_dir, profile_dir=rpx_dir / "profile_default",
                      env=jupyter_env.kernel_env(rpx_dir))
    try:
        t0 = time.monotonic()
        try:
            r = c.ipcluster("start", "-n", "4", "--daemonize", timeout=180)
        except subprocess.TimeoutExpired:
            pytest.fail("`ipcluster start -n 4 --daemonize` did not return within 180 s\n" + c.log_tail(),
                        pytrace=False)
        if r.returncode != 0:
            pytest.fail(f"`ipcluster start -n 4 --daemonize` exited {r.returncode}\nstdout: {r.stdout}\n"
                        f"stderr: {r.stderr}\n{c.log_tail()}", pytrace=False)
        c.started_pids = H.pids_in(H.read_json(c.cluster_file) or {})
        H.wait_until(c.client_file.exists, 30, what=str(c.client_file))
        import ipyparallel  # the reference client only checks that 4 engines registered
        rc = ipyparallel.Client(str(c.client_file), timeout=30)
        try:
            rc.wait_for_engines(4, timeout=60)
            c.engine_ids = sorted(rc.ids)
        finally:
            rc.close()
        note("kernel cluster", f"{rpx_dir}: engines {c.engine_ids} after {time.monotonic() - t0:.1f} s")
        yield c
    finally:
        try:
            r = c.ipcluster("stop", timeout=60)
            if r.returncode != 0:
                note("kernel cluster: ipcluster stop", f"exit {r.returncode} {r.stderr.strip()[-300:]}")
        except subprocess.TimeoutExpired:
            note("kernel cluster: ipcluster stop", "did not return within 60 s")
        try:
            H.wait_until(lambda: not H.procs_with_env("RPX_DIR", str(rpx_dir)), 10, what="cluster exit")
        except TimeoutError:
            pass
        killed = H.sweep(rpx_dir)
        if killed:
            note("kernel cluster: processes left after `ipcluster stop` and kernel shutdown (SIGKILLed)",
                 "\n".join(killed))
        if os.environ.get("RPX_TEST_KEEP_DIR"):
            note("kernel cluster RPX_DIR kept", rpx_dir)
        else:
            shutil.rmtree(rpx_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def no_cluster_env(jupyter_env):
    """Kernel environment whose RPX_DIR holds no cluster (nor any profile)."""
    rpx_dir = Path(tempfile.mkdtemp(prefix="rpx-no-cluster-"))
    try:
        yield jupyter_env.kernel_env(rpx_dir)
    finally:
        killed = H.sweep(rpx_dir)
        if killed:
            note("no-cluster kernels left running (SIGKILLed)", "\n".join(killed))
        shutil.rmtree(rpx_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------

class CellTimeout(AssertionError):
    pass


OUTPUT_TYPES = ("stream", "display_data", "update_display_data", "execute_result", "error", "clear_output")


@dataclass
class Cell:
    code: str
    msg_id: str
    reply: dict  # execute_reply content
    messages: list  # [(msg_type, content)] of this cell's iopub outputs, in order
    elapsed: float
    input_requests: list = field(default_factory=list)  # `input_request` contents it sent

    @property
    def status(self):
        return self.reply.get("status")

    @property
    def execution_count(self):
        return self.reply.get("execution_count")

    def of_type(self, *types):
        return [c for t, c in self.messages if t in types]

    def stream(self, name):
        return "".join(c["text"] for c in self.of_type("stream") if c.get("name") == name)

    @property
    def stdout(self):
        return self.stream("stdout")

    @property
    def stderr(self):
        return self.stream("stderr")

    @property
    def errors(self):
        return self.of_type("error")

    @property
    def results(self):
        return self.of_type("execute_result")

    @property
    def displays(self):
        return self.of_type("display_data")

    @property
    def outputs(self):
        """The outputs a notebook would show, as nbformat-like dicts: consecutive stream text of
        one name merged, `update_display_data` applied to the display with that display_id,
        `clear_output` honoured."""
        outs = []
        by_id = {}
        for t, c in self.messages:
            if t == "clear_output":
                outs.clear()
                by_id.clear()
            elif t == "stream":
                if outs and outs[-1]["output_type"] == "stream" and outs[-1]["name"] == c["name"]:
                    outs[-1]["text"] += c["text"]
                else:
                    outs.append({"output_type": "stream", "name": c["name"], "text": c["text"]})
            elif t in ("display_data", "execute_result"):
                o = {"output_type": t, "data": dict(c.get("data", {})), "metadata": c.get("metadata", {})}
                outs.append(o)
                did = (c.get("transient") or {}).get("display_id")
                if did:
                    by_id.setdefault(did, []).append(o)
            elif t == "update_display_data":
                did = (c.get("transient") or {}).get("display_id")
                for o in by_id.get(did, []):
                    o["data"] = dict(c.get("data", {}))
                    o["metadata"] = c.get("metadata", {})
            elif t == "error":
                outs.append({"output_type": "error", "ename": c.get("ename"), "evalue": c.get("evalue"),
                             "traceback": c.get("traceback", [])})
        return outs

    @property
    def text(self):
        """Everything shown, as plain text (streams, text/plain of displays and results,
        tracebacks), in order, ANSI colours stripped."""
        parts = []
        for o in self.outputs:
            if o["output_type"] == "stream":
                parts.append(o["text"])
            elif o["output_type"] == "error":
                parts.append("\n".join(o["traceback"]) or f"{o['ename']}: {o['evalue']}")
            else:
                parts.append(str(o["data"].get("text/plain", "")))
            if parts and not parts[-1].endswith("\n"):
                parts[-1] += "\n"
        return strip_ansi("".join(parts))

    def mime(self, mime_type):
        """Every `mime_type` payload among displays and results."""
        return [o["data"][mime_type] for o in self.outputs
                if o["output_type"] in ("display_data", "execute_result") and mime_type in o["data"]]

    def error_text(self):
        """The reply's and the error messages' ename/evalue/traceback, ANSI stripped."""
        parts = []
        if self.status == "error":
            parts += [str(self.reply.get("ename", "")), str(self.reply.get("evalue", "")),
                      "\n".join(self.reply.get("traceback", []) or [])]
        for e in self.errors:
            parts += [str(e.get("ename", "")), str(e.get("evalue", "")), "\n".join(e.get("traceback", []))]
        return strip_ansi("\n".join(parts))

    def describe(self):
        return (f"cell {self.code!r}: status {self.status} after {self.elapsed:.1f} s\n"
                f"reply: {_short(self.reply)}\n--- shown\n{self.text}")

    def assert_ok(self):
        assert self.status == "ok", self.describe()
        assert not self.errors, self.describe()
        return self


def _short(obj, n=2000):
    s = repr(obj)
    return s if len(s) <= n else s[:n] + "..."


class Kernel:
    """A kernel started by jupyter_client's KernelManager, with a blocking client."""

    def __init__(self, km, kc, env, log_path, name):
        self.km = km
        self.kc = kc
        self.env = env
        self.log_path = log_path
        self.name = name
        self.cells_run = 0

    # -- lifecycle --------------------------------------------------------------------------
    @classmethod
    def start(cls, env, kernel_name=KERNEL_NAME, cwd=None, startup_timeout=KERNEL_STARTUP_TIMEOUT):
        from jupyter_client.manager import KernelManager

        cwd = Path(cwd or tempfile.mkdtemp(prefix="rpx-kernel-cwd-", dir=env.get("RPX_DIR")))
        log_path = cwd / f"kernel-{kernel_name}-{os.getpid()}-{time.monotonic_ns()}.log"
        log = open(log_path, "wb")
        km = KernelManager(kernel_name=kernel_name)
        try:
            km.start_kernel(env=env, cwd=str(cwd), stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()  # the child has its own copy
        kc = km.client()
        kc.start_channels()
        k = cls(km, kc, env, log_path, kernel_name)
        try:
            kc.wait_for_ready(timeout=startup_timeout)
        except RuntimeError as e:
            alive = km.is_alive()
            k.shutdown()
            raise AssertionError(f"kernel {kernel_name} not ready within {startup_timeout} s ({e}); "
                                 f"alive={alive}\n--- kernel log\n{k.log_tail()}") from None
        return k

    def shutdown(self):
        try:
            self.kc.stop_channels()
        except Exception:  # noqa: BLE001
            pass
        try:
            H.bounded(self.km.shutdown_kernel, now=False, timeout=30, what="shutdown_kernel")
        except Exception:  # noqa: BLE001
            try:
                self.km.shutdown_kernel(now=True)
            except Exception:  # noqa: BLE001
                pass

    def is_alive(self):
        return self.km.is_alive()

    def log_tail(self, n=60):
        try:
            lines = Path(self.log_path).read_text(errors="replace").splitlines()
        except OSError:
            return "(no kernel log)"
        return "\n".join(lines[-n:])

    # -- cells ------------------------------------------------------------------------------
    def run(self, code, timeout=None, silent=False, store_history=True, stop_on_error=True,
            allow_stdin=False, answer=None):
        """Execute one cell; wait (bounded) for its execute_reply and its `status: idle`.

        `answer(prompt, password) -> str` answers the cell's `input_request`s on the stdin
        channel (it implies `allow_stdin`); the requests are kept in `Cell.input_requests`."""
        allow_stdin = allow_stdin or answer is not None
        input_requests = []
        if timeout is None:
            timeout = FIRST_CELL_TIMEOUT if self.cells_run == 0 else CELL_TIMEOUT
        self.cells_run += 1
        t0 = time.monotonic()
        deadline = t0 + timeout
        msg_id = self.kc.execute(code, silent=silent, store_history=store_history,
                                 stop_on_error=stop_on_error, allow_stdin=allow_stdin)
        reply = None
        idle = False
        messages = []
        while reply is None or not idle:
            left = deadline - time.monotonic()
            if left <= 0:
                cell = Cell(code, msg_id, reply or {}, messages, time.monotonic() - t0)
                raise CellTimeout(
                    f"cell not finished within {timeout} s (reply {'seen' if reply else 'missing'}, "
                    f"idle {'seen' if idle else 'missing'}); kernel alive={self.is_alive()}\n"
                    f"{cell.describe()}\n--- kernel log\n{self.log_tail()}")
            if not idle:
                try:
                    msg = self.kc.get_iopub_msg(timeout=min(left, 0.2))
                except Empty:
                    msg = None
                if msg is not None and msg.get("parent_header", {}).get("msg_id") == msg_id:
                    t = msg["msg_type"]
                    if t == "status":
                        if msg["content"].get("execution_state") == "idle":
                            idle = True
                    elif t in OUTPUT_TYPES:
                        messages.append((t, msg["content"]))
            if answer is not None and reply is None:
                try:
                    req = self.kc.get_stdin_msg(timeout=0)
                except Empty:
                    req = None
                if req is not None and req["msg_type"] == "input_request" \
                        and req.get("parent_header", {}).get("msg_id") == msg_id:
                    input_requests.append(req["content"])
                    self.kc.input(answer(req["content"]["prompt"], req["content"].get("password", False)))
            if reply is None:
                try:
                    r = self.kc.get_shell_msg(timeout=0 if not idle else min(left, 0.2))
                except Empty:
                    r = None
                if r is not None and r.get("parent_header", {}).get("msg_id") == msg_id:
                    reply = r["content"]
        cell = Cell(code, msg_id, reply, messages, time.monotonic() - t0)
        cell.input_requests = input_requests
        return cell

    def request(self, method, *args, timeout=SHELL_TIMEOUT, **kwargs):
        """A shell request (`complete`, `inspect`, `is_complete`, `history`, `kernel_info`)
        and its reply message (header, content, ...)."""
        msg_id = getattr(self.kc, method)(*args, **kwargs)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CellTimeout(f"no reply to {method}{args} within {timeout} s\n--- kernel log\n"
                                  f"{self.log_tail()}")
            try:
                r = self.kc.get_shell_msg(timeout=min(left, 1.0))
            except Empty:
                continue
            if r.get("parent_header", {}).get("msg_id") == msg_id:
                return r

    def drain_iopub(self):
        """Drop iopub messages left over (e.g. after a request without outputs)."""
        while True:
            try:
                self.kc.get_iopub_msg(timeout=0.05)
            except Empty:
                return


def _kernel_fixture(env, what):
    try:
        k = Kernel.start(env)
    except AssertionError as e:
        pytest.fail(f"{what}: {e}", pytrace=False)
    return k


@pytest.fixture(scope="module")
def rpx_kernel(kernel_cluster):
    """One rpx kernel on the kernel tests' cluster, shared by the module's tests."""
    k = _kernel_fixture(kernel_cluster.env, "rpx kernel (cluster)")
    yield k
    k.shutdown()


@pytest.fixture(scope="module")
def rpx_kernel_no_cluster(no_cluster_env):
    """One rpx kernel whose RPX_DIR has no cluster."""
    k = _kernel_fixture(no_cluster_env, "rpx kernel (no cluster)")
    yield k
    k.shutdown()


@pytest.fixture
def start_kernel(request, jupyter_env):
    """Factory: start_kernel(env=None, kernel_name="rpx") -> Kernel; all shut down after the test.
    env defaults to `kernel_cluster.env` (the cluster is started only then)."""
    started = []

    def start(env=None, kernel_name=KERNEL_NAME, **kw):
        if env is None:
            env = request.getfixturevalue("kernel_cluster").env
        k = Kernel.start(env, kernel_name=kernel_name, **kw)
        started.append(k)
        return k

    yield start
    for k in started:
        k.shutdown()
