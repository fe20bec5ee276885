#!/usr/bin/env python3
"""Sums an Nsight Compute CSV (`ncu --metrics gpu__time_duration.sum --csv
--log-file F`) by kernel: count, total µs and share, largest first, then the
sum of all kernels. Used by benches/gpu/device_run.sh on one decode step.

    python3 benches/gpu/kernel_times.py ncu.csv
"""
import collections
import csv
import sys


def short(name):
    """A kernel's name without its argument list and template noise."""
    name = name.split("(")[0].strip()
    return name if len(name) <= 70 else name[:67] + "..."


def main(path):
    rows = []
    try:
        f = open(path, newline="")
    except OSError as e:
        print(f"{path}: {e}")
        return 1
    with f:
        lines = [l for l in f if l.startswith('"')]
    for r in csv.DictReader(lines):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        unit = r.get("Metric Unit", "ns")
        v = float(r["Metric Value"].replace(",", ""))
        scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}.get(unit, 1e-3)
        rows.append((short(r["Kernel Name"]), v * scale))
    if not rows:
        print(f"{path}: no kernel times (did the profiler start?)")
        return 1
    total = sum(t for _, t in rows)
    by = collections.defaultdict(lambda: [0, 0.0])
    for name, t in rows:
        by[name][0] += 1
        by[name][1] += t
    print(f"\n{path}: {len(rows)} kernels, {total:.1f} µs of kernel time")
    print("| kernel | launches | µs | share |\n|---|---:|---:|---:|")
    for name, (n, t) in sorted(by.items(), key=lambda kv: -kv[1][1]):
        print(f"| {name} | {n} | {t:.1f} | {100 * t / total:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
