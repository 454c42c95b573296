"""Markdown table of a pytest-benchmark JSON file: median per implementation, and how many
times faster fastablate is than each other implementation of the same group.

    python -m pytest bench --benchmark-only --benchmark-json=bench.json
    python bench/report.py bench.json
"""
import json
import sys
from collections import defaultdict

BASELINES = ("clean", "naive")  # groups with one of these also get each time relative to it


def main(path: str) -> None:
    data = json.load(open(path))
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    for b in data["benchmarks"]:
        groups[b["group"]][b["params"]["impl"]] = b
    machine = data["machine_info"]
    print(f"Machine: {machine.get('cpu', {}).get('brand_raw', machine.get('processor'))}, "
          f"{machine.get('cpu', {}).get('count', '?')} logical CPUs; Python {machine['python_version']}.\n")
    print("| group | implementation | median (ms) | fastablate is x faster | time / clean or naive | measured |")
    print("|---|---|---:|---:|---:|---:|")
    for group, impls in groups.items():
        median = {k: b["stats"]["median"] for k, b in impls.items()}
        base = next((median[k] for k in BASELINES if k in median), None)
        for impl, m in median.items():
            ours = median.get("fastablate-masked" if impl.endswith("masked") else "fastablate")
            ratio = f"{m / ours:.2f}" if ours and not impl.startswith("fastablate") else ""
            rel = f"{m / base:.3f}" if base else ""
            extra = ", ".join(f"{k}={v}" for k, v in impls[impl].get("extra_info", {}).items())
            print(f"| {group} | {impl} | {m * 1e3:.3f} | {ratio} | {rel} | {extra} |")


if __name__ == "__main__":
    main(sys.argv[1])
