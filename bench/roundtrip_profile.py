"""Where one trivial apply round trip spends its time, process by process (root; needs `perf`).

usage: python bench/roundtrip_profile.py [BIN_DIR] [OUT.md]

Runs `BIN_DIR/examples/bench_ops` with BENCH_ONLY=latency (a 2-engine cluster, sequential
round trips) under `perf record` of the scheduler's switch and wakeup events on every CPU, then
takes the busiest second of the client's main thread (round trips back to back) and adds up,
for each thread, the time it was running. The round trips run one at a time, so each process's
running time divided by the number of round trips is its share of one round trip's critical
path; the time no CPU ran any of them is the wakeup latency between the hops. Round trips are
counted as the wakeups of the client's main thread (one per result).

CPU-clock samples taken in the same recording split each row's running time by what its
threads were doing, from the function each sample fell in (the innermost one after inlining, so
the split is approximate): the kernel (system calls, the loopback TCP stack, pipes, wakeups),
rpx's own code, zeromq and the async runtime, message encoding (JSON, HMAC), memory (allocation
and copies), and the rest.

The same accounting then runs on the floor under that round trip (`BIN_DIR/examples/hop_floor
profile`: client -> guarded forwarding process -> echo process -> pipe child and back, nothing
but the zeromq crate, the guard and a pipe), so each rpx process stands next to the process that
does its transport work and nothing else: the controller next to the forwarder, the engine next
to the echo process, the worker next to the pipe child, the client next to the floor's client.

Prints two markdown tables (and writes them to OUT.md if given). BIN_DIR defaults to target/release.
"""
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

SWITCH = re.compile(r"prev_comm=(.*?) prev_pid=(\d+) .*? ==> next_comm=(.*?) next_pid=(\d+)")
WAKEUP = re.compile(r"comm=(.*?) pid=(\d+) ")
SAMPLE = re.compile(r"^\s*(\d+)\s+([\d.]+):\s+cpu-clock\S*:\s+[0-9a-f]+\s+(.*?)\s+\(([^)]*)\)\s*$")
# What a sample's function belongs to, first match wins (the kernel is told by its dso).
KINDS = [
    ("rpx code", re.compile(r"\brpx(_[a-z_]+)?::")),
    ("message encoding (JSON, HMAC)", re.compile(r"serde|sha2|hmac|digest|itoa|ryu|uuid|chrono")),
    ("zeromq, async runtime", re.compile(r"zeromq|tokio|mio::|futures|asynchronous_codec|bytes::")),
    ("memory (allocation, copies)", re.compile(r"\bmi_|_mi_|malloc|free|realloc|memmove|memcpy|memset|memcmp|_int_|alloc::|__rdl|__rust_")),
]
KERNEL = "kernel (system calls, TCP, pipes, wakeups)"
OTHER = "other user code"
LINE = re.compile(r"^\s*(.+?)\s+(\d+)/(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+sched:(sched_switch|sched_wakeup):\s+(.*)$")


def record(cmd, env, tmp, name):
    """Run `cmd` under perf (switches, wakeups, CPU-clock samples on every CPU); returns its stdout
    and the parsed events: (events, samples, pid_of, comm_of)."""
    data = os.path.join(tmp, f"{name}.data")
    run = subprocess.run(["perf", "record", "-q", "-e", "sched:sched_switch", "-e", "sched:sched_wakeup",
                          "-e", "cpu-clock/freq=1999/", "-a", "-o", data, "--"] + cmd, env=env, check=True,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    script = subprocess.run(["perf", "script", "-i", data, "-F", "trace:comm,pid,tid,cpu,time,event,trace",
                             "-F", "sw:tid,time,event,ip,sym,dso"],
                            capture_output=True, text=True, check=True).stdout
    events, samples = [], []
    pid_of, comm_of = {}, {}
    for line in script.splitlines():
        sm = SAMPLE.match(line)
        if sm:
            samples.append((int(sm.group(1)), float(sm.group(2)), sm.group(3), sm.group(4)))
            continue
        m = LINE.match(line)
        if not m:
            continue
        comm, pid, tid, cpu, t, kind, rest = m.groups()
        pid_of[int(tid)], comm_of[int(tid)] = int(pid), comm
        events.append((float(t), int(cpu), kind, int(tid), rest))
    return run.stdout, (events, samples, pid_of, comm_of)


def table(recorded, main_tid, role, title):
    """The busiest second of `main_tid`'s wakeups (one per round trip): each role's running time
    per round trip, split by what its samples were doing. Returns markdown lines."""
    events, samples, pid_of, comm_of = recorded
    per_second = collections.Counter(int(t) for t, _, kind, tid, rest in events
                                     if kind == "sched_wakeup" and int(WAKEUP.search(rest).group(2)) == main_tid)
    start = max(per_second, key=per_second.get)
    end = start + 1.0
    trips = per_second[start]
    running = collections.Counter()
    current, since = {}, {}
    for t, cpu, kind, tid, rest in events:
        if kind != "sched_switch":
            continue
        m = SWITCH.search(rest)
        nxt = int(m.group(4))
        if cpu in current and start <= t < end:
            running[current[cpu]] += t - max(since[cpu], start)
        current[cpu], since[cpu] = nxt, t
        comm_of.setdefault(nxt, m.group(3))
    by_role = collections.Counter()
    for tid, secs in running.items():
        by_role[role(tid)] += secs
    kinds_of = collections.defaultdict(collections.Counter)
    for tid, t, sym, dso in samples:
        if tid == 0 or not start <= t < end:
            continue
        kind = KERNEL if "kernel" in dso else next((k for k, r in KINDS if r.search(sym)), OTHER)
        kinds_of[role(tid)][kind] += 1
    columns = [KERNEL] + [k for k, _ in KINDS] + [OTHER]
    rt = 1.0 / trips
    lines = [f"{title}: {trips} round trips in the busiest second (one every {rt * 1e6:.0f} µs).",
             "",
             "| thread(s) | running per round trip (µs) | share of a round trip | " + " | ".join(columns) + " |",
             "|---|---:|---:|" + "---:|" * len(columns)]
    total_kinds = collections.Counter()
    for name, secs in sorted(by_role.items(), key=lambda kv: -kv[1]):
        if name == "idle":
            continue
        us = secs / trips * 1e6
        kinds = kinds_of.get(name, collections.Counter())
        n = sum(kinds.values())
        split = [us * kinds[c] / n if n else 0.0 for c in columns]
        for c, v in zip(columns, split):
            total_kinds[c] += v
        lines.append(f"| {name} | {us:.0f} | {secs / trips / rt:.0%} | " + " | ".join(f"{v:.0f}" for v in split) + " |")
    busy = sum(s for n, s in by_role.items() if n != "idle")
    # With one round trip at a time, what no CPU spent running is time between the hops.
    lines.append(f"| nothing of the round trip running (wakeups between hops) | {(1.0 - busy) / trips * 1e6:.0f} |"
                 f" {(1.0 - busy) / trips / rt:.0%} |" + " |" * len(columns))
    lines.append("| every process | " + f"{busy / trips * 1e6:.0f} | {busy / trips / rt:.0%} | "
                 + " | ".join(f"{total_kinds[c]:.0f}" for c in columns) + " |")
    return lines


def main():
    bins = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "target/release")
    out = sys.argv[2] if len(sys.argv) > 2 else None
    with tempfile.TemporaryDirectory(prefix="rpx-rt-profile-") as tmp:
        result = os.path.join(tmp, "latency.json")
        env = dict(os.environ, BENCH_ONLY="latency", RPX_BIN_DIR=bins)
        _, rpx = record([os.path.join(bins, "examples", "bench_ops"), result], env, tmp, "rpx")
        bench = json.load(open(result))
        printed, floor = record([os.path.join(bins, "examples", "hop_floor"), "profile", "6000"], dict(os.environ), tmp, "floor")
    # rpx: the client's main thread is the bench_ops process's first thread.
    _, _, pid_of, comm_of = rpx
    main_tid = next(tid for tid, c in comm_of.items() if c == "bench_ops" and pid_of[tid] == tid)

    # Name each thread by its process: pids of the cluster from their comm, the client's by pid.
    def rpx_role(tid):
        if tid == 0:
            return "idle"
        pid, comm = pid_of.get(tid, tid), comm_of.get(tid, "?")
        if pid == pid_of.get(main_tid):
            return "client: main thread" if tid == main_tid else f"client: {comm}"
        if comm_of.get(pid, comm).startswith("ipcontroller"):
            return "controller"
        if comm.startswith("ipengine"):
            # The engine and its worker process both run as `ipengine`: one row per process.
            return f"ipengine, pid {pid}"
        return "other"

    # The floor: hop_floor prints its own (the client's), its forwarder's and its echo process's
    # pids; the remaining hop_floor process is the echo's pipe child.
    pids = {role: int(pid) for role, pid in (line.split() for line in printed.splitlines() if line.strip())}
    _, _, fpid_of, fcomm_of = floor
    floor_main = pids["client"]

    def floor_role(tid):
        if tid == 0:
            return "idle"
        pid, comm = fpid_of.get(tid, tid), fcomm_of.get(tid, "?")
        if pid == floor_main:
            return "floor: client"
        if pid == pids["forwarder"]:
            return "floor: forwarder, guarded (the controller's transport)"
        if pid == pids["echo"]:
            return "floor: echo process (the engine's transport)"
        if comm == "hop_floor":
            return "floor: pipe child (the worker's)"
        return "other"

    lines = [f"bench_ops's medians: direct {bench['apply_direct_mean_s']['median'] * 1e6:.0f} µs, load-balanced "
             f"{bench['apply_lb_mean_s']['median'] * 1e6:.0f} µs; {os.cpu_count()} CPUs.", ""]
    lines += table(rpx, main_tid, rpx_role, "rpx, one trivial apply at a time")
    lines += [""]
    lines += table(floor, floor_main, floor_role, "The floor, `hop_floor profile` (zeromq crate, guard and pipe only)")
    lines += ["", "Columns after the share: µs per round trip of each row's running time, split by its CPU-clock "
              "samples (by the function each fell in, after inlining)."]
    text = "\n".join(lines)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
