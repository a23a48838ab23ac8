"""Data-layer benchmark: `data check` throughput and the cost of caching the real CT series.

Run: .venv/bin/python benchmarks/bench_data.py [--samples .cache/real-samples] [--no-write]
Writes the "## Data layer" section of docs/benchmarks.md (other sections untouched).
Each measurement runs in a fresh subprocess so peak RSS (ru_maxrss) belongs to it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from markdown_section import replace_section  # sibling: benchmarks/ is sys.path[0] as a script

REPO = Path(__file__).resolve().parents[1]
HEADING = "## Data layer"

_CHILD = r"""
import json, resource, sys, tempfile, time
import torch
torch.set_num_threads(2)
from fed_unimiss.data.scan import scan
from fed_unimiss.data.cache import build_cache
what, root = sys.argv[1], sys.argv[2]
t = time.perf_counter()
if what == "check":
    report = scan(root)
    n = report.summary()["files_seen"]
else:
    with tempfile.TemporaryDirectory() as work:
        index = build_cache(root, work)
        n = index.summary()["ct_tiles"]
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "n": n, "peak_mb": peak}))
"""


def _measure(what: str, root: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, what, str(root)], capture_output=True,
                          text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _baseline() -> float:
    proc = subprocess.run([sys.executable, "-c", _CHILD.split("what, root")[0] + "import resource\n"
                           "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"],
                          capture_output=True, text=True, check=True)
    return float(proc.stdout.strip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=Path, default=REPO / ".cache" / "real-samples")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    series = args.samples / "sinus-ct-dicom"
    if not series.is_dir():
        print(f"missing {series}; fetch the real samples first", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        from fed_unimiss.data.phantom import write_phantoms

        write_phantoms(tmp, 8, 8, seed=0)
        check_phantom = _measure("check", Path(tmp))
    check_real = _measure("check", series)
    cache_real = _measure("cache", series)
    base = _baseline()
    rows = [
        ("`data check`, real sinus CT series (163 x 512^2 DICOM)",
         f"{check_real['n'] / check_real['seconds']:.0f} files/s "
         f"({check_real['seconds']:.2f} s for {check_real['n']} files)"),
        ("`data check`, phantoms (4 DICOM series + 4 NIfTI, 8 X-rays)",
         f"{check_phantom['n'] / check_phantom['seconds']:.0f} files/s "
         f"({check_phantom['seconds']:.2f} s for {check_phantom['n']} files)"),
        ("preprocess + cache the real 163-slice series (scan, decode, resample to 3x1x1 mm, "
         f"tile; {cache_real['n']} tiles)", f"{cache_real['seconds']:.2f} s"),
        ("peak RSS of that process (import baseline)",
         f"{cache_real['peak_mb']:.0f} MB ({base:.0f} MB)"),
    ]
    stamp = time.strftime("%Y-%m-%d")
    body = [HEADING, "",
            f"`.venv/bin/python benchmarks/bench_data.py` on {stamp}, {platform.machine()}, "
            f"{os.cpu_count()} CPU cores (1-min load average at the end {os.getloadavg()[0]:.1f}), "
            "torch threads 2, warm page cache.", "",
            "| measurement | result |", "|---|---|"]
    body += [f"| {a} | {b} |" for a, b in rows]
    section = "\n".join(body) + "\n"
    print(section)
    if not args.no_write:
        _write_section(REPO / "docs" / "benchmarks.md", section)
    return 0


def _write_section(path: Path, section: str) -> None:
    replace_section(path, HEADING, section)


if __name__ == "__main__":
    sys.exit(main())
