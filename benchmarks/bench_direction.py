"""The direction check's margin: how honest and sign-flipped updates point.

A sign-flipped update has an honest norm, so only its direction gives it away. The aggregator
compares each reply's *teacher* update with the coordinate-wise median of the other replies'
(``aggregator.screening.cosines_to_others``) and rejects it below ``min_cosine`` (-0.1). This
runs the real micro federation in process (``simulate``) on phantom sites, for two site layouts,
two local-step counts and several seeds, once with site M honest and once with M sending its
update negated (``--attack M=signflip``), and reports the cosines the check saw:

- teacher, round 1 and later rounds, honest sites (lowest) and the flipped site (highest);
- student, which is not checked: the same leave-one-out cosine, computed on the same replies by
  wrapping the strategy's ``screen_round`` (observation only: the decisions are untouched), to
  show why no threshold on it separates the two;
- the teacher's cosine with the median of *all* replies, the flipped one included (the check
  before it left the reply out), to show what leaving it out buys.

    .venv/bin/python benchmarks/bench_direction.py --write docs/benchmarks.md
    .venv/bin/python benchmarks/bench_direction.py --seeds 0 --local-steps 4 --rounds 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from markdown_section import replace_section  # sibling: benchmarks/ is sys.path[0] as a script

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SECTION = "## The direction check's margin"
# name -> sites (name, CT volumes, X-ray films, phantom seed); M is added to each.
LAYOUTS = {
    "mixed": (("ct", 2, 0, 1), ("xr", 0, 4, 2), ("both", 1, 2, 3)),  # as test_attacks.py
    "split": (("ct1", 2, 0, 1), ("ct2", 3, 0, 5), ("xr1", 0, 4, 2), ("xr2", 0, 3, 6)),
}
ATTACKER = ("M", 1, 3, 4)


def _config(root: Path, local_steps: int, seed: int) -> Path:
    body = {"recipe": str(REPO / "configs" / "pretrain" / "micro.yaml"),
            "recipe_overrides": {"ssl": {"steps_per_epoch": 2, "batch_size_2d": 4,
                                         "batch_size_3d": 1, "threads": 1, "seed": seed}},
            "local_steps": local_steps, "min_sites": 2, "round_timeout": 3600,
            "evaluate": False, "poll_interval": 0.05}  # every robustness setting at its default
    path = root / f"fed-{local_steps}-{seed}.yaml"
    path.write_text(json.dumps(body))
    return path


class _Observer:
    """Wraps ``screen_round`` to record the leave-one-out cosines of student and teacher."""

    def __init__(self) -> None:
        self.rounds: list[dict[str, dict[str, float]]] = []

    def __enter__(self) -> _Observer:
        import aggregator.strategy as strategy
        from aggregator.screening import cosines_to_others

        self._strategy, self._screen = strategy, strategy.screen_round

        def screen_and_record(norms, states, global_state, *args, **kwargs):
            medians, verdicts = self._screen(norms, states, global_state, *args, **kwargs)
            judged = {lb: states[lb] for lb, v in verdicts.items() if v.cosine}
            cosines = cosines_to_others(judged, global_state, ("student", "teacher")) \
                if len(judged) >= 3 else {}
            for lb, c in _to_median_of_all(judged, global_state).items():
                cosines[lb]["teacher_all"] = c
            self.rounds.append(cosines)
            return medians, verdicts

        strategy.screen_round = screen_and_record
        return self

    def __exit__(self, *exc) -> None:
        self._strategy.screen_round = self._screen


def _to_median_of_all(states: dict, global_state: dict) -> dict[str, float]:
    """Cosine of each teacher update with the coordinate-wise median of all of them."""
    import torch

    from aggregator.order_stats import coordinate_median

    if len(states) < 3:
        return {}
    names = [n for n in global_state if n.startswith("teacher.")]
    deltas = torch.stack([torch.cat([(s[n].double() - global_state[n].double()).reshape(-1)
                                     for n in names]) for s in states.values()])
    median = coordinate_median(deltas)
    return {lb: float(d @ median / (d.norm() * median.norm()))
            for lb, d in zip(states, deltas, strict=True)}


def _run(root: Path, layout: str, local_steps: int, seed: int, rounds: int, flipped: bool
         ) -> list[dict]:
    """Per round: site -> {student, teacher cosine, action}."""
    from aggregator.simulate_cli import simulate
    from fed_unimiss.data.phantom import write_phantoms

    sites = {}
    for name, ct, xr, phantom_seed in (*LAYOUTS[layout], ATTACKER):
        path = root / f"data-{layout}-{seed}" / name
        if not path.exists():
            write_phantoms(path, n_ct=ct, n_xray=xr, seed=phantom_seed + 10 * seed)
        sites[name] = path
    out = root / f"{layout}-{local_steps}-{seed}-{'flip' if flipped else 'honest'}"
    with _Observer() as seen, contextlib.redirect_stdout(sys.stderr):
        simulate(_config(root, local_steps, seed), list(sites.items()), rounds, out,
                 attacks={ATTACKER[0]: "signflip"} if flipped else None)
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    return [{site: {**cos, "action": row["decisions"][site]["action"]}
             for site, cos in cosines.items()}
            for row, cosines in zip(rows, seen.rounds, strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    ap.add_argument("--local-steps", nargs="+", type=int, default=[4, 12])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--write", type=Path, help="update this markdown file's section")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.basicConfig(level=logging.ERROR)
    import torch

    torch.set_num_threads(1)
    results = []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for layout in args.layouts:
            for steps in args.local_steps:
                for seed in args.seeds:
                    for flipped in (False, True):
                        rounds = _run(Path(tmp), layout, steps, seed, args.rounds, flipped)
                        results.append({"layout": layout, "local_steps": steps, "seed": seed,
                                        "flipped": flipped, "rounds": rounds})
                        print(json.dumps(results[-1]), flush=True)
    seconds = time.time() - t0
    if args.write:
        replace_section(args.write, SECTION, _markdown(results, args, seconds))


def _cosines(results: list[dict], layout: str, steps: int, part: str, first: bool,
             flipped_site: bool) -> list[float]:
    out = []
    for res in results:
        if res["layout"] != layout or res["local_steps"] != steps:
            continue
        for i, cosines in enumerate(res["rounds"]):
            if (i == 0) != first:
                continue
            for site, c in cosines.items():
                if (res["flipped"] and site == ATTACKER[0]) == flipped_site:
                    out.append(c[part])
    return out


def _count(results: list[dict], layout: str, steps: int, flipped_site: bool) -> str:
    """'rejected / judged' replies of honest sites, or of the flipped site."""
    judged = rejected = 0
    for res in results:
        if res["layout"] != layout or res["local_steps"] != steps:
            continue
        for cosines in res["rounds"]:
            for site, c in cosines.items():
                if (res["flipped"] and site == ATTACKER[0]) == flipped_site:
                    judged += 1
                    rejected += c["action"] == "rejected"
    return f"{rejected}/{judged}"


def _markdown(results: list[dict], args: argparse.Namespace, seconds: float) -> str:
    def span(values: list[float], lowest: bool) -> str:
        return f"{min(values) if lowest else max(values):+.3f}" if values else "-"

    lines = [SECTION, "",
             f"`{' '.join(['.venv/bin/python', 'benchmarks/bench_direction.py'] + sys.argv[1:])}`"
             f" on {platform.node() or 'this machine'} (2 shared CPU cores, OMP_NUM_THREADS=1), "
             f"{seconds / 60:.1f} min. Micro federation (batches 4/1, 2-step epochs, every "
             f"robustness setting at its default), {args.rounds} rounds, recipe seeds "
             f"{' '.join(map(str, args.seeds))} (the phantom patients vary with the seed). "
             "Layouts: *mixed* = ct (2 CT), xr (4 X-rays), both (1 CT + 2 X-rays); *split* = two "
             "CT-only and two X-ray-only sites; each plus site M (1 CT + 3 X-rays), run once "
             "honest and once sending its update negated (`--attack M=signflip`).", "",
             "Cosine of each reply's update with the coordinate-wise median of the other "
             "replies' updates (`aggregator/screening.py`, `cosines_to_others`). The check "
             "rejects a reply whose **teacher** cosine is below min_cosine -0.1; the student "
             "columns are computed on the same replies to show why the student is not checked. "
             "The column *vs the median of all* is the check as it was before it left the "
             "judged reply out. Honest: the lowest over the honest sites of both runs; flipped: "
             "the highest of M when flipping.", "",
             "| layout | local steps | teacher, round 1: honest / flipped | teacher, rounds "
             "2+: honest / flipped | student, rounds 2+: honest / flipped | teacher vs the "
             "median of all, round 1: honest / flipped | rejected: honest / flipped |",
             "|---|---|---|---|---|---|---|"]
    for layout in args.layouts:
        for steps in args.local_steps:
            cells = []
            for part, first in (("teacher", True), ("teacher", False), ("student", False),
                                ("teacher_all", True)):
                honest = _cosines(results, layout, steps, part, first, False)
                flipped = _cosines(results, layout, steps, part, first, True)
                cells.append(f"{span(honest, True)} / {span(flipped, False)}")
            rejected = (f"{_count(results, layout, steps, False)} / "
                        f"{_count(results, layout, steps, True)}")
            lines.append(f"| {layout} | {steps} | " + " | ".join(cells) + f" | {rejected} |")
    honest_t = [c for lay in args.layouts for s in args.local_steps for f in (True, False)
                for c in _cosines(results, lay, s, "teacher", f, False)]
    flipped_t = [c for lay in args.layouts for s in args.local_steps for f in (True, False)
                 for c in _cosines(results, lay, s, "teacher", f, True)]
    lines += ["", f"Over all runs: honest teacher cosines {min(honest_t):+.3f} to "
              f"{max(honest_t):+.3f} ({len(honest_t)} replies), flipped {min(flipped_t):+.3f} to "
              f"{max(flipped_t):+.3f} ({len(flipped_t)} replies)."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
