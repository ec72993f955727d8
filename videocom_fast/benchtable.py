"""The ratio table of a pytest-benchmark JSON file (`make bench`, `videocom-fast bench`).

Within each benchmark group every row is compared with the group's baseline: the benchmark whose
`extra_info["role"] == "baseline"`, else the slowest one. Extra figures a bench records in `extra_info`
(tokens/s, GB/s, fraction outside the model, ...) are printed beside it.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path


def ratio_rows(data: dict) -> list[dict]:
    groups = defaultdict(list)
    for b in data.get("benchmarks", []):
        groups[b.get("group") or b["fullname"].split("::")[0]].append(b)
    rows = []
    for group, bs in sorted(groups.items()):
        base = next((b for b in bs if b.get("extra_info", {}).get("role") == "baseline"), None)
        base = base or max(bs, key=lambda b: b["stats"]["mean"])
        for b in sorted(bs, key=lambda b: b["stats"]["mean"]):
            extra = {k: v for k, v in b.get("extra_info", {}).items() if k != "role"}
            rows.append({"group": group, "name": b["name"], "mean_ms": b["stats"]["mean"] * 1e3,
                         "speedup": base["stats"]["mean"] / b["stats"]["mean"], "baseline": base["name"],
                         "extra": extra})
    return rows


def print_table(path) -> None:
    data = json.loads(Path(path).read_text())
    mi = data.get("machine_info", {})
    print(f"\nmachine: {mi.get('cpu', {}).get('brand_raw', mi.get('processor', '?'))}, "
          f"{mi.get('cpu', {}).get('count', '?')} cores; commit {data.get('commit_info', {}).get('id', '?')[:10]}")
    print(f"{'group':28} {'benchmark':44} {'mean ms':>10} {'x baseline':>10}  extra")
    for r in ratio_rows(data):
        extra = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["extra"].items())
        print(f"{r['group'][:28]:28} {r['name'][:44]:44} {r['mean_ms']:10.3f} {r['speedup']:10.2f}  {extra}")


if __name__ == "__main__":
    import sys
    print_table(sys.argv[1])
