"""Every notebook in notebooks/ runs top to bottom on the `rpx` kernel against a live cluster
(the kernel tests' own, 4 engines), as a new user would run it, and shows what its text promises.

nbclient executes each notebook in a fresh kernel (kernelspec `rpx`, RPX_DIR of the cluster in
the kernel's environment) and fails on any error output, except in cells tagged
`raises-exception` (the notebooks' deliberate errors), which must then show an error. The
executed copies go to tests/python/artifacts/notebooks/ for a look afterwards.
"""

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError

pytest.register_assert_rewrite("kernel_fixtures")  # before its import: it is also a plugin
import kernel_fixtures as K  # noqa: E402
import rpx_helpers as H

pytest_plugins = ["kernel_fixtures"]

NOTEBOOK_DIR = H.REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
ARTIFACTS = Path(__file__).resolve().parent / "artifacts" / "notebooks"
CELL_TIMEOUT = 600  # the first cell that mentions rpx:: compiles the client crate in the kernel


def output_text(cell):
    """What a cell shows, as plain text: streams, text/plain of displays and results, tracebacks."""
    parts = []
    for o in cell.get("outputs", []):
        t = o.get("output_type")
        if t == "stream":
            parts.append(o.get("text", ""))
        elif t in ("display_data", "execute_result"):
            parts.append(str(o.get("data", {}).get("text/plain", "")))
        elif t == "error":
            parts.append("\n".join(o.get("traceback", [])) or f"{o.get('ename')}: {o.get('evalue')}")
        if parts and not parts[-1].endswith("\n"):
            parts[-1] += "\n"
    return K.strip_ansi("".join(parts))


def mime_outputs(cell, mime):
    return [o["data"][mime] for o in cell.get("outputs", [])
            if o.get("output_type") in ("display_data", "execute_result") and mime in o.get("data", {})]


def errors(cell):
    return [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]


class Executed:
    """An executed notebook, its code cells found by the start of their source."""

    def __init__(self, nb):
        self.nb = nb
        self.code_cells = [c for c in nb.cells if c.cell_type == "code"]

    def cell(self, starts_with, nth=0):
        found = [c for c in self.code_cells if c.source.lstrip().startswith(starts_with)]
        assert len(found) > nth, f"no code cell #{nth} starting with {starts_with!r}"
        return found[nth]

    def text(self, starts_with, nth=0):
        return output_text(self.cell(starts_with, nth))

    def dump(self):
        out = []
        for i, c in enumerate(self.code_cells):
            out.append(f"--- In[{c.get('execution_count')}] (code cell {i}): {c.source.splitlines()[0][:80]!r}\n"
                       f"{output_text(c)[:1500]}")
        return "\n".join(out)


def labels(text, kind="stdout"):
    """The engine ids of every `[stdout:N]` label in text."""
    return sorted({int(m) for m in re.findall(rf"\[{kind}:(\d+)\]", text)})


def execute(path, env, workdir):
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name=K.KERNEL_NAME, timeout=CELL_TIMEOUT,
                            startup_timeout=K.KERNEL_STARTUP_TIMEOUT, allow_errors=False,
                            resources={"metadata": {"path": str(workdir)}})
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    out_path = ARTIFACTS / path.name
    try:
        client.execute(env=env, cwd=str(workdir))
    except (CellExecutionError, CellTimeoutError) as e:
        nbformat.write(nb, out_path)
        raise AssertionError(f"{path.name} failed; executed copy in {out_path}\n{e}\n"
                             f"--- outputs so far\n{Executed(nb).dump()}") from None
    finally:
        nbformat.write(nb, out_path)
    print(f"executed notebook: {out_path}")
    return Executed(nb)


def check_deliberate_errors(ex):
    for c in ex.code_cells:
        if "raises-exception" in c.metadata.get("tags", []):
            assert errors(c), f"cell tagged raises-exception shows no error:\n{c.source}\n{output_text(c)}"


def check_01(ex, ids):
    t = ex.text('%px println!("hello from engine')
    assert labels(t) == ids, t
    for i in ids:
        assert f"hello from engine {i}" in t, t

    t = ex.text("%px v.iter().sum")
    for i in ids:
        assert re.search(rf"Out\[{i}:\d+\]: 55\b", t), t

    t = ex.text("%%px --targets 0:2")
    assert labels(t) == ids[0:2], t
    assert "[2, 4, 6, 8, 10, 12, 14, 16, 18, 20]" in t, t

    assert "%autopx enabled" in ex.text("%autopx", 0)
    t = ex.text("let squares")
    assert labels(t) == ids, f"the cell after %autopx did not run on every engine:\n{t}"
    assert t.count(": 385") == len(ids), t
    assert "%autopx disabled" in ex.text("%autopx", 1)

    assert "the kernel is free" in ex.text('println!("the kernel is free')
    t = ex.text("%pxresult")
    assert labels(t) == ids, t
    for i in ids:
        assert f"engine {i} woke up" in t, t

    t = ex.text('%px println!("engine {} has an even id"')
    assert labels(t) == ids[::2], t
    assert "Parallel execution on engine(s): [0, 2]" in t, t

    t = ex.text('%px let n: u32 = "not a number"')
    assert "E0308" in t, t
    for i in ids:
        assert f"[{i}:execute]" in t, t

    c = ex.cell("%%px\nmatch std::env::var")
    t = output_text(c)
    assert "engine 1 gives up" in t, t
    assert "[1:execute]" in t, t
    for i in ids:
        if i != 1:
            assert f"engine {i} is fine" in t, t
            assert f"[{i}:execute]" not in t, t

    t = ex.text("%px v.len()")
    for i in ids:
        assert re.search(rf"Out\[{i}:\d+\]: 10\b", t), t


def check_02(ex, ids):
    t = ex.text("let client = rpx::Client::connect()")
    assert f"connected to {len(ids)} engines: {ids}" in t, t
    t = ex.text("let squares")
    assert "1000 squares: [0, 1, 4, 9, 16] ... [990025, 992016, 994009, 996004, 998001]" in t, t
    t = ex.text("let ar = client.view().map_async")
    assert "of 200 items done" in t, t
    assert "all 200 items done: 4000 ms of sleep in total" in t, t
    t = ex.text("let mut per_engine")
    m = re.search(r"tasks per engine: \{(.*)\}", t)
    assert m, t
    assert sum(int(x.split(":")[1]) for x in m.group(1).split(",")) == 200, t
    t = ex.text("let t = std::time::Instant::now()")
    assert re.search(r"chunksize 1: +10000 tasks", t), t
    assert re.search(r"chunksize 500: +20 tasks", t), t
    t = ex.text("let delays")
    assert "submitted: [800, 600, 400, 200]" in t, t
    for what in ("completed: ", r"ordered\(false\) map: "):
        m = re.search(what + r"\[([\d, ]+)\]", t)
        assert m and sorted(int(x) for x in m.group(1).split(",")) == [200, 400, 600, 800], t
        if len(ids) >= 4:  # one item per engine: they finish shortest first
            assert m.group(1) == "200, 400, 600, 800", t
    t = ex.text("match client.view().map")
    assert "the map failed" in t and "13 is unlucky" in t, t
    assert "map_results: 19 items ok, 1 failed" in t, t


def check_03(ex, ids):
    t = ex.text("let client = rpx::Client::connect()")
    assert f"{len(ids)} engines, 8 batches of 1000000 throws" in t, t
    t = ex.text("%%px\nlet counts")
    assert labels(t) == ids, t
    seeds = sorted(int(s) for m in re.findall(r"seeds \[([\d, ]*)\]", t) for s in m.split(",") if s.strip())
    assert seeds == list(range(1, 9)), f"the 8 seeds were not scattered over the engines:\n{t}"
    t = ex.text("let counts: Vec<u64> = dv.gather")
    m = re.search(r"(\d+) engines threw (\d+) points: pi ≈ (\d\.\d+)", t)
    assert m, t
    assert int(m.group(1)) == len(ids) and int(m.group(2)) == 8_000_000, t
    assert abs(float(m.group(3)) - 3.14159) < 0.01, t
    t = ex.text("let (width, height, max_iter)")
    m = re.search(r"170 rows of 240 pixels; \d+ pixels never escaped: area ≈ (\d\.\d+)", t)
    assert m and 1.4 < float(m.group(1)) < 1.7, t
    svgs = mime_outputs(ex.cell("const ENGINE_COLOURS"), "image/svg+xml")
    assert len(svgs) == 1 and svgs[0].lstrip().startswith("<svg") and "<path" in svgs[0], svgs
    html = mime_outputs(ex.cell("let mut per_engine"), "text/html")
    assert len(html) == 1 and "<table>" in html[0], html
    rows = re.findall(r"<tr><td>(\d+)</td>", html[0])
    assert rows and set(int(r) for r in rows) <= set(ids), html[0]


CHECKS = {"01-px-basics.ipynb": check_01, "02-load-balanced-map.ipynb": check_02,
          "03-parallel-computation.ipynb": check_03}


def test_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == sorted(CHECKS), [p.name for p in NOTEBOOKS]
    for p in NOTEBOOKS:
        nb = nbformat.read(p, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata.kernelspec == {"name": "rpx", "display_name": "Rust (rpx)", "language": "rust"}
        for c in nb.cells:
            if c.cell_type == "code":
                assert not c.outputs and c.execution_count is None, f"{p.name}: outputs committed"


@pytest.mark.timeout(2400)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook(path, kernel_cluster, tmp_path):
    ex = execute(path, kernel_cluster.env, tmp_path)
    check_deliberate_errors(ex)
    check = CHECKS.get(path.name)
    assert check, f"no checks for {path.name}: add them to CHECKS"
    try:
        check(ex, kernel_cluster.engine_ids)
    except AssertionError as e:
        raise AssertionError(f"{path.name}: {e}\n--- all outputs\n{ex.dump()}") from None
