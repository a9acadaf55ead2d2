"""Where one trivial apply round trip spends its time, process by process (root; needs `perf`).

usage: python bench/roundtrip_profile.py [BIN_DIR] [OUT.md]

Runs `BIN_DIR/examples/bench_ops` with BENCH_ONLY=latency (a 2-engine cluster, sequential
round trips) under `perf record` of the scheduler's switch and wakeup events on every CPU, then
takes the busiest second of the client's main thread (round trips back to back) and adds up,
for each thread, the time it was running. The round trips run one at a time, so each process's
running time divided by the number of round trips is its share of one round trip's critical
path; the time no CPU ran any of them is the wakeup latency between the hops. Round trips are
counted as the wakeups of the client's main thread (one per result).

Prints a markdown table (and writes it to OUT.md if given). BIN_DIR defaults to target/release.
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
LINE = re.compile(r"^\s*(.+?)\s+(\d+)/(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+sched:(sched_switch|sched_wakeup):\s+(.*)$")


def main():
    bins = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "target/release")
    out = sys.argv[2] if len(sys.argv) > 2 else None
    with tempfile.TemporaryDirectory(prefix="rpx-rt-profile-") as tmp:
        data, result = os.path.join(tmp, "sched.data"), os.path.join(tmp, "latency.json")
        env = dict(os.environ, BENCH_ONLY="latency", RPX_BIN_DIR=bins)
        subprocess.run(["perf", "record", "-q", "-e", "sched:sched_switch", "-e", "sched:sched_wakeup", "-a", "-o", data,
                        "--", os.path.join(bins, "examples", "bench_ops"), result], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        script = subprocess.run(["perf", "script", "-i", data, "-F", "comm,pid,tid,cpu,time,event,trace"],
                                capture_output=True, text=True, check=True).stdout
        bench = json.load(open(result))
    events = []
    pid_of, comm_of = {}, {}
    for line in script.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        comm, pid, tid, cpu, t, kind, rest = m.groups()
        pid_of[int(tid)], comm_of[int(tid)] = int(pid), comm
        events.append((float(t), int(cpu), kind, int(tid), rest))
    # The client's main thread: the bench_ops process's first thread.
    main_tid = next(tid for tid, c in comm_of.items() if c == "bench_ops" and pid_of[tid] == tid)
    # Its busiest second: the round trips, back to back.
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
        prev, nxt = int(m.group(2)), int(m.group(4))
        if cpu in current and start <= t < end:
            running[current[cpu]] += t - max(since[cpu], start)
        current[cpu], since[cpu] = nxt, t
        comm_of.setdefault(nxt, m.group(3))

    # Name each thread by its process: pids of the cluster from their comm, the client's by pid.
    def role(tid):
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

    by_role = collections.Counter()
    for tid, secs in running.items():
        by_role[role(tid)] += secs
    cpus = len({cpu for _, cpu, _, _, _ in events})
    rt = 1.0 / trips
    lines = [f"Round trips in the busiest second: {trips} (one every {rt * 1e6:.0f} µs); bench_ops's medians: "
             f"direct {bench['apply_direct_mean_s']['median'] * 1e6:.0f} µs, load-balanced "
             f"{bench['apply_lb_mean_s']['median'] * 1e6:.0f} µs; {cpus} CPUs.",
             "",
             "| thread(s) | running per round trip (µs) | share of a round trip |",
             "|---|---:|---:|"]
    for name, secs in sorted(by_role.items(), key=lambda kv: -kv[1]):
        if name == "idle":
            continue
        lines.append(f"| {name} | {secs / trips * 1e6:.0f} | {secs / trips / rt:.0%} |")
    busy = sum(s for n, s in by_role.items() if n != "idle")
    # With one round trip at a time, what no CPU spent running is time between the hops.
    lines.append(f"| nothing of the round trip running (wakeups between hops) | {(1.0 - busy) / trips * 1e6:.0f} |"
                 f" {(1.0 - busy) / trips / rt:.0%} |")
    text = "\n".join(lines)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
