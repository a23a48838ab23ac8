"""Does bf16 autocast train the same model as fp32? Loss and teacher curves side by side.

bf16 changes the numerics (8 mantissa bits in the forward), so equivalence is a statement about
training, not about one step: the same micro pretraining (``fed-unimiss pretrain``, the real
command) runs in fp32 and in bf16 for several seeds, and the bf16 curves must stay inside the
run-to-run spread of the fp32 seeds. Compared per seed: the mean loss over the last quarter of the
run, and the teacher entropy and KL at the end (the collapse indicators of docs/pretraining.md).

    .venv/bin/python benchmarks/bench_precision.py --steps 300 --seeds 0 1 2 --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from markdown_section import replace_section  # sibling: benchmarks/ is sys.path[0] as a script

REPO = Path(__file__).resolve().parents[1]
SECTION = "## bf16 against fp32: training equivalence"
CLI = [sys.executable, "-m", "fed_unimiss.cli.main"]


def _run(work: Path, data: Path, precision: str, seed: int, steps: int) -> dict:
    recipe = yaml.safe_load((REPO / "configs" / "pretrain" / "micro.yaml").read_text())
    recipe["ssl"].update(seed=seed, threads=1, log_every=5)
    config = work / f"micro-{seed}.yaml"
    config.write_text(yaml.safe_dump(recipe))
    out = work / f"{precision}-{seed}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    subprocess.run([*CLI, "pretrain", "--config", str(config), "--data", str(data), "--out",
                    str(out), "--steps", str(steps), "--precision", precision, "--device", "cpu",
                    "--no-progress"], check=True, capture_output=True, env=env)
    seconds = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    tail = [r["loss"] for r in rows if r["step"] >= 0.75 * steps]
    last = [r for r in rows if "teacher_entropy" in r][-4:]
    return {"precision": precision, "seed": seed, "seconds": seconds,
            "loss_last_quarter": statistics.mean(tail),
            "teacher_entropy": statistics.mean(r["teacher_entropy"] for r in last),
            "kl": statistics.mean(r["kl"] for r in last),
            "curve": [(r["step"], r["loss"]) for r in rows]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--work", type=Path)
    p.add_argument("--write", type=Path)
    a = p.parse_args(argv)
    work = a.work or Path(tempfile.mkdtemp(prefix="bench-precision-"))
    data = work / "data"
    if not data.exists():
        subprocess.run([*CLI, "data", "phantom", str(data), "--ct", "4", "--xray", "32",
                        "--seed", "1"], check=True, capture_output=True)
    runs = []
    for seed in a.seeds:
        for precision in ("fp32", "bf16"):
            runs.append(_run(work, data, precision, seed, a.steps))
            r = runs[-1]
            print(f"seed {seed} {precision}: last-quarter loss {r['loss_last_quarter']:.3f}, "
                  f"teacher entropy {r['teacher_entropy']:.3f}, KL {r['kl']:.3f} "
                  f"({r['seconds']:.0f} s)", flush=True)
    (work / "results.json").write_text(json.dumps(runs))
    by = {(r["precision"], r["seed"]): r for r in runs}
    lines = [SECTION, "",
             f"Measured with `python benchmarks/bench_precision.py --steps {a.steps} --seeds "
             f"{' '.join(map(str, a.seeds))}`: `fed-unimiss pretrain` with the micro recipe "
             f"(configs/pretrain/micro.yaml, its seed set per run) on 4 phantom CT + 32 X-rays, "
             f"{a.steps} steps, 1 thread, `--precision fp32` and `--precision bf16`. Loss: the "
             "mean over the last quarter of the run; teacher entropy and KL: the mean of the last "
             "four logged steps.", "",
             "| seed | loss fp32 | loss bf16 | teacher entropy fp32 | bf16 | KL fp32 | bf16 |",
             "|---|---|---|---|---|---|---|"]
    for seed in a.seeds:
        f, b = by[("fp32", seed)], by[("bf16", seed)]
        lines.append(f"| {seed} | {f['loss_last_quarter']:.3f} | {b['loss_last_quarter']:.3f} | "
                     f"{f['teacher_entropy']:.3f} | {b['teacher_entropy']:.3f} | {f['kl']:.3f} | "
                     f"{b['kl']:.3f} |")
    for key, name in (("loss_last_quarter", "loss"), ("teacher_entropy", "teacher entropy"),
                      ("kl", "KL")):
        f32 = [by[("fp32", s)][key] for s in a.seeds]
        b16 = [by[("bf16", s)][key] for s in a.seeds]
        diffs = [b - f for b, f in zip(b16, f32, strict=True)]
        lines.append("")
        lines.append(f"- {name}: fp32 seeds span {min(f32):.3f}-{max(f32):.3f} (range "
                     f"{max(f32) - min(f32):.3f}); bf16 minus fp32 per seed "
                     f"{', '.join(f'{d:+.3f}' for d in diffs)}; largest |difference| "
                     f"{max(abs(d) for d in diffs):.3f}.")
    text = "\n".join(lines)
    print("\n" + text)
    if a.write:
        replace_section(a.write, SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
