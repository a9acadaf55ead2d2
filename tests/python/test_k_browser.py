"""JupyterLab in a real browser: a user opens a notebook on the `rpx` kernel, runs
`%px println!("hello from engine ...")` and sees each engine's output under its `[stdout:N]`
label.

JupyterLab is served on 127.0.0.1 (a free port, a token, no browser of its own), its root a temp
dir holding one prepared notebook, with the rpx kernelspec on JUPYTER_PATH and the RPX_DIR of the
kernel tests' cluster in its environment (the kernels it starts inherit both). Debian's headless
chromium (/usr/bin/chromium, `apt-get install chromium`) is driven by Playwright; nothing is
downloaded. The page is saved as tests/python/artifacts/browser-px.png.
"""

import os
import re
import secrets
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

pytest.register_assert_rewrite("kernel_fixtures")  # before its import: it is also a plugin
import kernel_fixtures as K  # noqa: E402
import rpx_helpers as H

pytest_plugins = ["kernel_fixtures"]

CHROMIUM = Path(os.environ.get("RPX_TEST_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
SERVER_TIMEOUT = 120  # JupyterLab answering /api/status
PAGE_TIMEOUT = 120  # the notebook open with its kernel idle
OUTPUT_TIMEOUT = 360  # kernel start (evcxr) + a first %px on a cold compiler

PX_CELL = '%px println!("hello from engine {}", std::env::var("RPX_ENGINE_ID").unwrap());'


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_notebook(path, kernel_name, display_name, language, source):
    nb = new_notebook(cells=[
        new_markdown_cell("Run the cell below: it prints a line on every engine."),
        new_code_cell(source),
    ])
    nb.metadata = {"kernelspec": {"name": kernel_name, "display_name": display_name, "language": language}}
    nbformat.write(nb, path)


class Lab:
    """A JupyterLab server we started; stopped (and its kernels shut down) by stop()."""

    def __init__(self, root, env, log_path):
        self.root = root
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.log_path = log_path
        self.log = open(log_path, "wb")
        cmd = [H.VENV_PYTHON, "-m", "jupyterlab", "--no-browser",
               "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
               f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={root}",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
               "--ServerApp.allow_remote_access=False"]
        if os.geteuid() == 0:
            cmd.append("--allow-root")
        self.proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    @property
    def base(self):
        return f"http://127.0.0.1:{self.port}"

    def url(self, path):
        return f"{self.base}/{path}?token={self.token}"

    def log_tail(self, n=60):
        self.log.flush()
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout=SERVER_TIMEOUT):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"jupyter lab exited {self.proc.returncode}\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url("api/status"), timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError as e:
                last = e
            time.sleep(0.5)
        raise AssertionError(f"jupyter lab not answering on {self.base} within {timeout} s ({last})\n"
                             f"{self.log_tail()}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the server shuts its kernels down, then exits
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                H.note("jupyter lab", "did not exit within 30 s of SIGTERM: killed")
        H.kill_tree(self.proc)
        self.log.close()


def chromium_args():
    args = ["--disable-gpu", "--disable-dev-shm-usage"]
    if os.geteuid() == 0:
        args.append("--no-sandbox")  # chromium refuses to run as root with its sandbox
    return args


def run_cell_in_lab(env, kernel_name, display_name, language, source, expected, screenshot,
                    output_timeout=OUTPUT_TIMEOUT):
    """Serve a one-cell notebook with JupyterLab, open it in headless chromium, run its code
    cell with Shift+Enter and wait until the cell's output shows every string in `expected`.
    Returns the output text; saves a screenshot of the page (also on failure)."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    root = Path(tempfile.mkdtemp(prefix="rpx-lab-", dir=env.get("RPX_DIR")))
    write_notebook(root / "px-hello.ipynb", kernel_name, display_name, language, source)
    # No "get notified about Jupyter news?" pop-up over the page (and no request for news).
    settings = root.parent / f"{root.name}-settings"
    notif = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notif.parent.mkdir(parents=True)
    notif.write_text('{"fetchNews": "false", "checkForUpdates": false}')
    env = dict(env, JUPYTERLAB_SETTINGS_DIR=str(settings))
    lab = Lab(root, env, root.parent / f"{root.name}.log")
    try:
        lab.wait_ready()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=chromium_args(),
                                         timeout=60_000)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                page.set_default_timeout(PAGE_TIMEOUT * 1000)
                try:
                    return _drive(page, lab, display_name, expected, output_timeout)
                finally:
                    screenshot.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        page.screenshot(path=str(screenshot), full_page=True)
                        print(f"screenshot: {screenshot}")
                        H.note("browser screenshot", screenshot)
                    except PlaywrightError as e:
                        H.note("browser screenshot failed", e)
            finally:
                browser.close()
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- jupyter lab log\n{lab.log_tail()}") from None
    finally:
        lab.stop()


def _drive(page, lab, display_name, expected, output_timeout):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    t0 = time.monotonic()
    page.goto(lab.url("lab/tree/px-hello.ipynb"))
    # The notebook is open and connected to its kernel: the status bar reads "<kernel> | Idle".
    # (The toolbar's execution indicator says idle before the kernel's websocket is connected;
    # a cell run then is silently dropped by JupyterLab.)
    cell = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell").first
    cell.wait_for(state="visible")
    ready = f"{display_name} | Idle"
    try:
        page.wait_for_function(
            "([ready]) => (document.querySelector('#jp-main-statusbar')?.innerText || '').includes(ready)",
            arg=[ready], timeout=PAGE_TIMEOUT * 1000, polling=250)
    except PlaywrightTimeout:
        bar = page.evaluate("() => document.querySelector('#jp-main-statusbar')?.innerText")
        raise AssertionError(f"the status bar did not read {ready!r} within {PAGE_TIMEOUT} s: {bar!r}") from None
    print(f"notebook open, kernel idle after {time.monotonic() - t0:.1f} s")
    cell.locator(".cm-content").click()
    page.keyboard.press("Shift+Enter")
    prompt = cell.locator(".jp-InputPrompt")
    try:  # queued or run: `[*]:` or `[1]:`
        page.wait_for_function(
            """() => /\\[(\\*|\\d+)\\]/.test(document.querySelector(
                '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .jp-InputPrompt')?.innerText || '')""",
            timeout=30_000, polling=250)
    except PlaywrightTimeout:
        raise AssertionError(f"JupyterLab did not run the cell: its prompt still reads {prompt.inner_text()!r} "
                             "30 s after Shift+Enter") from None
    outputs = cell.locator(".jp-OutputArea-output")
    try:
        page.wait_for_function(
            """([expected]) => {
                const cell = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell');
                if (!cell) return false;
                const text = [...cell.querySelectorAll('.jp-OutputArea-output')].map(o => o.innerText).join('\\n');
                return expected.every(e => text.includes(e));
            }""",
            arg=[expected], timeout=output_timeout * 1000, polling=500)
    except PlaywrightTimeout:
        shown = "\n".join(outputs.all_inner_texts())
        raise AssertionError(f"the cell's output did not show {expected} within {output_timeout} s; "
                             f"it shows:\n{shown}") from None
    print(f"outputs shown after {time.monotonic() - t0:.1f} s")
    return "\n".join(outputs.all_inner_texts())


@pytest.mark.timeout(900)
def test_px_in_jupyterlab(kernel_cluster):
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} missing: install Debian's chromium (`apt-get install chromium`; "
                    ".ci/run does it in CI) to run the browser test")
    ids = kernel_cluster.engine_ids
    expected = [f"[stdout:{i}]" for i in ids] + [f"hello from engine {i}" for i in ids]
    text = run_cell_in_lab(kernel_cluster.env, "rpx", "Rust (rpx)", "rust", PX_CELL, expected,
                           ARTIFACTS / "browser-px.png")
    # Each engine's line sits under its own label.
    for i in ids:
        assert re.search(rf"\[stdout:{i}\]\s*hello from engine {i}\b", text), text
    assert {int(i) for i in re.findall(r"\[stdout:(\d+)\]", text)} == set(ids), text
