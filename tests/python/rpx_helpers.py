"""Helpers shared by the interop tests: bounded waits, process lookup, error text, raw signing.

Nothing here waits without a bound: every loop has a deadline, and calls of the Python
client that have no timeout of their own (queue_status, hub_history, result_status, which
wait on a future forever) go through `bounded()`, which gives up after `timeout` seconds.
"""

import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
from ipyparallel import error

REPO = Path(__file__).resolve().parents[2]
RELEASE = Path(os.environ.get("RPX_BIN_DIR", REPO / "target" / "release"))  # override: e.g. a debug build
BINARIES = ("ipcluster", "ipcontroller", "ipengine", "rpx-compiler")
VENV_PYTHON = os.environ.get("RPX_TEST_PYTHON", sys.executable)

# Generous bounds: a 2-core machine, and the first cell of a cluster waits for evcxr.
FIRST_CELL_TIMEOUT = 180
CELL_TIMEOUT = 120
QUERY_TIMEOUT = 30

NOTES = []  # (title, text) printed in the terminal summary (timings, leftovers, observations)


def note(title, text):
    NOTES.append((title, str(text)))
    print(f"{title}: {text}")


def missing_binaries():
    return [b for b in BINARIES if not (RELEASE / b).is_file()]


def bounded(fn, *args, timeout=QUERY_TIMEOUT, what=None, **kwargs):
    """Run fn(*args, **kwargs) in a daemon thread; raise TimeoutError if it takes longer than timeout.

    (A daemon thread, so a call that never returns cannot keep the test process alive at exit.)
    """
    box = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    t = threading.Thread(target=target, daemon=True, name=f"bounded-{what or fn}")
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"{what or getattr(fn, '__name__', fn)} did not answer within {timeout} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def wait_until(pred, timeout, interval=0.1, what="condition"):
    """Poll pred() until it is truthy; return its value, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def run_cell(view, code, timeout=CELL_TIMEOUT, silent=False, return_exceptions=False):
    """execute() non-blocking, then wait with a bound for the reply and for the outputs.

    Returns (ar, result). Raises what ar.get raises (RemoteError / CompositeError).
    """
    ar = view.execute(code, silent=silent, block=False)
    result = ar.get(timeout=timeout, return_exceptions=return_exceptions)
    finish_output(ar)
    return ar, result


def finish_output(ar, timeout=15):
    """Wait for the engines' 'status: idle' on iopub, which says all output has arrived."""
    ok = ar.wait_for_output(timeout=timeout)
    assert ok, (
        f"outputs of {ar.msg_ids} incomplete after {timeout} s: no iopub 'status: idle' with this parent "
        "(ipyparallel's blocking execute() would hang here)"
    )


def as_list(x):
    return x if isinstance(x, list) else [x]


def error_text(exc):
    """Everything a user could read from a remote error: str, ename, evalue, traceback per engine."""
    parts = [str(exc)]
    if isinstance(exc, error.CompositeError):
        for en, ev, etb, ei in exc.elist:
            parts += [str(en), str(ev), "\n".join(etb) if isinstance(etb, list) else str(etb), str(ei)]
    elif isinstance(exc, error.RemoteError):
        tb = exc.traceback
        parts += [str(exc.ename), str(exc.evalue), "\n".join(tb) if isinstance(tb, list) else str(tb)]
    return "\n".join(parts)


def enames(exc):
    if isinstance(exc, error.CompositeError):
        return [e[0] for e in exc.elist]
    if isinstance(exc, error.RemoteError):
        return [exc.ename]
    return [type(exc).__name__]


# ---------------------------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------------------------

def pids_in(obj):
    """Every integer under a key containing 'pid' anywhere in a JSON document."""
    found = set()

    def walk(o, key=""):
        if isinstance(o, dict):
            for k, v in o.items():
                walk(v, str(k))
        elif isinstance(o, list):
            for v in o:
                walk(v, key)
        elif isinstance(o, int) and not isinstance(o, bool) and "pid" in key.lower() and o > 1:
            found.add(o)

    walk(obj)
    return found


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def procs_with_env(var, value):
    """Our processes whose environment has var=value (a unique temp dir marks our cluster)."""
    needle = f"{var}={value}".encode()
    out = []
    me = os.getpid()
    for p in psutil.process_iter(["pid"]):
        if p.pid == me:
            continue
        try:
            with open(f"/proc/{p.pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if needle in env:
            out.append(p)
    return out


def ppid_of(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("PPid:"):
                return int(line.split()[1])
    raise RuntimeError(f"no PPid in /proc/{pid}/status")


def cmdline(pid):
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def kill_pids(pids, sig=signal.SIGKILL):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def kill_tree(proc):
    """SIGKILL a Popen we started and every descendant it has."""
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        kids = []
    kill_pids([proc.pid] + [k.pid for k in kids])
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass
    psutil.wait_procs([k for k in kids if k.is_running()], timeout=10)


# ---------------------------------------------------------------------------------------------
# raw messages (for the bad-signature tests)
# ---------------------------------------------------------------------------------------------

DELIM = b"<IDS|MSG>"


def raw_msg(key, msg_type, content, session=None, sign_with=None):
    """Frames [DELIM, hmac, header, parent, metadata, content] signed with sign_with (default key)."""
    header = {
        "msg_id": uuid.uuid4().hex,
        "msg_type": msg_type,
        "username": "rpx-test",
        "session": session or uuid.uuid4().hex,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime()),
        "version": "5.4",
    }
    frames = [json.dumps(x).encode() for x in (header, {}, {}, content)]
    k = (key if sign_with is None else sign_with).encode()
    mac = hmac.new(k, digestmod=hashlib.sha256)
    for fr in frames:
        mac.update(fr)
    return header, [DELIM, mac.hexdigest().encode()] + frames


def parse_reply(frames):
    """(header, content) of a received multipart reply, skipping routing identities."""
    i = frames.index(DELIM)
    return json.loads(frames[i + 2]), json.loads(frames[i + 5])


def sweep(rpx_dir, extra_pids=()):
    """SIGKILL every process left of a test cluster: those carrying RPX_DIR=rpx_dir (a unique
    temp dir: only that cluster, its kernels and their children) and those of `extra_pids` that
    still do (not a reused pid). Returns descriptions of what was killed."""
    victims = {p.pid: p for p in procs_with_env("RPX_DIR", str(rpx_dir))}
    for pid in extra_pids:
        try:
            p = psutil.Process(pid)
        except psutil.Error:
            continue
        if pid not in victims and p in procs_with_env("RPX_DIR", str(rpx_dir)):
            victims[pid] = p
    desc = []
    for pid, p in victims.items():
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            desc.append(f"{pid} {cmdline(pid)[:120]}")
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(list(victims.values()), timeout=10)
    return desc


def log_tail(profile_dir, n=40):
    """The last `n` lines of each log of a profile (for failure messages)."""
    out = []
    logdir = Path(profile_dir) / "log"
    if logdir.is_dir():
        for p in sorted(logdir.iterdir()):
            try:
                lines = p.read_text(errors="replace").splitlines()[-n:]
            except OSError:
                continue
            out.append(f"--- {p.name}\n" + "\n".join(lines))
    return "\n".join(out)
