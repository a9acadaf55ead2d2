"""Where the same-host 100 MB transfers spend their time, transfer by transfer (root; needs `perf`).

usage: python bench/data_profile.py [BIN_DIR] [OUT.md]

Runs `BIN_DIR/examples/bench_ops` with BENCH_ONLY=data (a 2-engine cluster; BENCH_REPS, default
7, rounds of push, pull, pull_view, scatter and gather, then the floors it measures without a
cluster) under `perf record` sampling every CPU with call chains, on the monotonic clock.
`bench_ops` reports when each transfer ran on the same clock, so every sample taken while a
transfer ran is that transfer's: the table adds them up per transfer, as CPU milliseconds per
transfer, by what the CPU was doing, read from the sample's call chain:
- zeroing new pages: the kernel clearing pages it hands out (new memory, new tmpfs pages);
- mapping and faults: populating mappings and handling page faults, zeroing aside;
- unmapping: tearing mappings down and freeing what they held;
- copying: memcpy in user space, and the kernel copying to or from user memory;
- other kernel: system calls, sockets, scheduling (messages and wakeups);
- user code: everything else in user space (rpx, zeromq, the runtime);
- idle: no process ran (waiting for another process or the kernel's wakeups).
On 2 CPUs the columns add up to twice the transfer's time.

Prints a markdown table (and writes it to OUT.md if given). BIN_DIR defaults to target/release.
"""
import collections
import json
import os
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile

FREQ = 1999
HEADER = re.compile(r"^(\S.*?)\s+(\d+)/(\d+)\s+([\d.]+):")
CATEGORIES = ["zeroing new pages", "mapping and faults", "unmapping", "copying", "other kernel", "user code", "idle"]
UNMAPPING = {"__vm_munmap", "__do_munmap", "do_vmi_munmap", "do_vmi_align_munmap", "unmap_region", "unmap_vmas",
             "zap_pte_range", "unmap_page_range", "tlb_finish_mmu", "release_pages", "free_pages_and_swap_cache"}
ZEROING = ("clear_page", "clear_huge_page", "clear_subpage", "folio_zero", "clear_user")
FAULTS = {"asm_exc_page_fault", "exc_page_fault", "handle_mm_fault", "__mm_populate", "populate_vma_page_range",
          "madvise_populate", "faultin_page", "filemap_map_pages", "do_fault_around"}
COPYING = ("memmove", "memcpy", "copy_user", "rep_movs", "_copy_to_user", "_copy_from_user", "copy_page")


def category(frames):
    """What a sample's call chain (leaf first: (symbol, dso)) was doing."""
    names = [f[0] for f in frames]
    if any(n in UNMAPPING for n in names):
        return "unmapping"
    if any(n.startswith(ZEROING) for n in names):
        return "zeroing new pages"
    if any(n in FAULTS for n in names):
        return "mapping and faults"
    leaf, dso = frames[0] if frames else ("?", "?")
    if any(c in leaf for c in COPYING):
        return "copying"
    return "other kernel" if "kernel" in dso else "user code"


def samples(data):
    """(time, comm, pid, frames) of each sample of a perf.data file."""
    out = subprocess.run(["perf", "script", "-i", data, "-F", "comm,pid,tid,time,ip,sym,dso"],
                         capture_output=True, text=True, check=True).stdout
    head, frames = None, []
    for line in out.splitlines() + [""]:
        if not line.strip():
            if head:
                yield (*head, frames)
            head, frames = None, []
        elif line[0].isspace():
            parts = line.split(None, 1)
            rest = parts[1] if len(parts) > 1 else "?"
            sym, _, dso = rest.rpartition(" (")
            frames.append((sym.split("+")[0].strip(), dso.rstrip(")")))
        else:
            m = HEADER.match(line)
            head = m and (float(m.group(4)), m.group(1), int(m.group(2)))


def main():
    bins = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "target/release")
    out = sys.argv[2] if len(sys.argv) > 2 else None
    with tempfile.TemporaryDirectory(prefix="rpx-data-profile-") as tmp:
        data, result = os.path.join(tmp, "perf.data"), os.path.join(tmp, "data.json")
        env = dict(os.environ, BENCH_ONLY="data", BENCH_REPS=os.environ.get("BENCH_REPS", "7"), RPX_BIN_DIR=bins)
        bench = subprocess.Popen(["perf", "record", "-q", "-F", str(FREQ), "-a", "-g", "--clockid", "monotonic",
                                  "-o", data, "--", os.path.join(bins, "examples", "bench_ops"), result],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if bench.wait() != 0:
            sys.exit(f"perf record of bench_ops failed ({bench.returncode})")
        report = json.load(open(result))
        windows = {**report["data_windows_s"], **report.get("floor_windows_s", {})}
        spans = sorted((s, e, op) for op, ws in windows.items() for s, e in ws)
        cpu = collections.defaultdict(collections.Counter)  # op -> category -> samples
        # Per process, so that the client (the process whose main thread runs as `bench_ops`)
        # gets all of its threads' samples, whichever of them was seen first.
        by_pid = collections.defaultdict(lambda: collections.defaultdict(collections.Counter))
        client_pid = None
        for t, comm, pid, frames in samples(data):
            if comm == "bench_ops" and client_pid is None:
                client_pid = pid
            op = next((op for s, e, op in spans if s <= t < e), None)
            if op is None:
                continue
            what = "idle" if pid == 0 else category(frames)
            cpu[op][what] += 1
            by_pid[pid][op][what] += 1
        client_cpu = by_pid[client_pid]
    ms = 1000.0 / FREQ
    lines = ["| transfer (100 MB) | n | ms each (median) | " + " | ".join(CATEGORIES) + " | the client's share |",
             "|---|---:|---:|" + "---:|" * len(CATEGORIES) + "---:|"]
    for op, ws in windows.items():
        n = len(ws)
        each = statistics.median(e - s for s, e in ws) * 1000
        cells = [f"{cpu[op][c] * ms / n:.1f}" for c in CATEGORIES]
        busy = sum(v for c, v in cpu[op].items() if c != "idle")
        share = sum(client_cpu[op].values()) / busy if busy else 0
        lines.append(f"| {op} | {n} | {each:.1f} | " + " | ".join(cells) + f" | {share:.0%} |")
    text = "\n".join([
        f"CPU milliseconds per transfer by what the CPUs did, sampled at {FREQ} Hz on every CPU "
        f"(`bench/data_profile.py`, {report.get('reps')} repetitions; the floors ran without a cluster).",
        "", *lines])
    print(text)
    if out:
        pathlib.Path(out).write_text(text + "\n")


if __name__ == "__main__":
    main()
