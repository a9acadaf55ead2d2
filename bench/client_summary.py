"""The rows of issue 11's table that `client_bench.sh` measures, rpx next to each peer measured in
the same run: medians of the repetitions, and the ratio to rpx (how many times rpx is faster).

usage: python bench/client_summary.py RPX.json [ipp=IPP.json] [dask=DASK.json] [ray=RAY.json]
Prints a markdown table. Round trips are the mean of each repetition's calls (as the peers'
scripts measure them), the median over repetitions.
"""
import json
import sys

PEERS = {"ipp": "ipyparallel 9", "dask": "Dask", "ray": "Ray"}

# (row, rpx key, unit, higher is better, {peer: path in its JSON})
ROWS = [
    ("one trivial apply round trip, direct", "apply_direct_mean_s", "µs", False,
     {"ipp": "latency.direct_rc0.us_per_rtt", "dask": "latency.submit_result.us_per_rtt", "ray": "latency.get_remote.us_per_rtt"}),
    ("one trivial apply round trip, load-balanced", "apply_lb_mean_s", "µs", False,
     {"ipp": "latency.loadbalanced.us_per_rtt"}),
    ("10,000 trivial tasks (load-balanced map, chunksize 1)", "lb_map_tasks_per_s", "tasks/s", True,
     {"ipp": "throughput.lview_map_async_chunk1.tasks_per_s", "dask": "throughput.client_map.tasks_per_s", "ray": "throughput.remote_list_get.tasks_per_s"}),
    ("push 100 MB to one engine", "push_gb_per_s", "GB/s", True,
     {"ipp": "data.push_1engine_MBps", "dask": "data.push_1worker_MBps", "ray": "data.push_actor_MBps"}),
    ("pull 100 MB from one engine", "pull_gb_per_s", "GB/s", True,
     {"ipp": "data.pull_1engine_MBps", "dask": "data.pull_1worker_MBps", "ray": "data.pull_actor_MBps"}),
    # The same pull, the vector read where it lies (`pull_view`: the engine's snapshot mapped, no
    # copy), next to the peers' one pull: ipyparallel's unpacks a numpy array over the received
    # message (`frombuffer`, no copy either), Ray's reads its object store.
    ("pull 100 MB from one engine, read where it lies (pull_view)", "pull_view_gb_per_s", "GB/s", True,
     {"ipp": "data.pull_1engine_MBps", "dask": "data.pull_1worker_MBps", "ray": "data.pull_actor_MBps"}),
    ("scatter 100 MB over 2 engines", "scatter_gb_per_s", "GB/s", True,
     {"ipp": "data.scatter_2engines_MBps", "dask": "data.scatter_2workers_MBps", "ray": "data.scatter_2actors_MBps"}),
    ("gather 100 MB from 2 engines", "gather_gb_per_s", "GB/s", True,
     {"ipp": "data.gather_2engines_MBps", "dask": "data.gather_2workers_MBps", "ray": "data.gather_2actors_MBps"}),
]

ROWS_BY_KEY = {key: paths for _, key, _, _, paths in ROWS}


def lookup(doc, path):
    for part in path.split("."):
        if not isinstance(doc, dict) or part not in doc:
            return None
        doc = doc[part]
    return doc.get("median") if isinstance(doc, dict) else doc


def rpx_value(rpx, key, unit):
    v = rpx.get(key, {}).get("median") if isinstance(rpx.get(key), dict) else None
    if v is None:
        return None
    return v * 1e6 if unit == "µs" else v


def peer_value(doc, path, unit):
    v = lookup(doc, path)
    if v is None:
        return None
    return v / 1000 if unit == "GB/s" else v


def fmt(v, unit):
    if v is None:
        return "-"
    if unit == "GB/s":
        return f"{v:.2f}"
    return f"{v:,.0f}"


def main():
    rpx = json.load(open(sys.argv[1]))
    peers = {}
    for arg in sys.argv[2:]:
        name, path = arg.split("=", 1)
        peers[name] = json.load(open(path))
    head = ["measure", "rpx"] + [f"{PEERS[p]} (rpx x)" for p in peers]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row, key, unit, higher, paths in ROWS:
        r = rpx_value(rpx, key, unit)
        cells = [f"{row} ({unit})", fmt(r, unit)]
        for p, doc in peers.items():
            v = peer_value(doc, paths[p], unit) if p in paths else None
            if v is None or r is None:
                cells.append(fmt(v, unit))
                continue
            ratio = r / v if higher else v / r
            cells.append(f"{fmt(v, unit)} (x{ratio:.1f})")
        print("| " + " | ".join(cells) + " |")
    cpu = {k.rsplit("_", 1)[-1]: v["median"] for k, v in rpx.items() if k.startswith("lb_map_cpu_us_per_task_")}
    if cpu:
        parts = ", ".join(f"{role} {us:.0f}" for role, us in sorted(cpu.items()) if us)
        print(f"\nrpx CPU per load-balanced task (µs, medians): {parts}; total {sum(cpu.values()):.0f}.")

    budget = [(name, rpx.get(f"budget_{key}_us", {}).get("median")) for name, key in
              [("client -> engine", "to_engine"), ("in the engine (worker round trip included)", "in_engine"),
               ("engine -> client", "back")]]
    if all(v is not None for _, v in budget):
        parts = ", ".join(f"{name} {v:.0f}" for name, v in budget)
        print(f"\nrpx direct round trip by segment (µs, medians of 1,000, from the task's timestamps): {parts}.")
    closure = [(name, rpx.get(key)) for name, key in [("as soon as the cluster is up", "closure_first_call_s"),
                                                      ("on a warm cluster", "closure_first_call_warm_s")]]
    if any(v is not None for _, v in closure):
        parts = ", ".join(f"{name} {v:.2f} s" for name, v in closure if v is not None)
        print(f"\nrpx first call of a new closure: {parts}.")


if __name__ == "__main__":
    main()
