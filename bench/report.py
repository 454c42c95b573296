"""Markdown table of a pytest-benchmark JSON file: median per implementation, and how many
times faster fastablate is than each other implementation of the same group.

    python -m pytest bench --benchmark-only --benchmark-json=bench.json
    python bench/report.py bench.json
"""
import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    data = json.load(open(path))
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    for b in data["benchmarks"]:
        groups[b["group"]][b["params"]["impl"]] = b["stats"]["median"]
    machine = data["machine_info"]
    print(f"Machine: {machine.get('cpu', {}).get('brand_raw', machine.get('processor'))}, "
          f"{machine.get('cpu', {}).get('count', '?')} logical CPUs; Python {machine['python_version']}.\n")
    print("| group | implementation | median (ms) | fastablate is x faster |")
    print("|---|---|---:|---:|")
    for group, impls in groups.items():
        fast = {k: v for k, v in impls.items() if k.startswith("fastablate")}
        for impl, median in impls.items():
            ours = fast.get("fastablate-masked" if impl.endswith("masked") else "fastablate", None)
            ratio = f"{median / ours:.2f}" if ours and not impl.startswith("fastablate") else ""
            print(f"| {group} | {impl} | {median * 1e3:.3f} | {ratio} |")


if __name__ == "__main__":
    main(sys.argv[1])
