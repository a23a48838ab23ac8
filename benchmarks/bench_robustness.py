"""One attacking site against each aggregation mode: the robustness table.

For every aggregation mode (mean, clipped_mean, median, trimmed_mean) this runs, with the real
ServerApp and ClientApps in process (``simulate``) on phantom sites and the micro federation
(local_steps 4, batches 4/1, 2-step epochs, as configs/federation/micro.yaml):

- the honest run: 3 honest sites (CT only, X-ray only, both), the reference;
- the honest 4-site run: the same plus a 4th honest site, for the loss curve and to count honest
  sites that the screening clipped or rejected;
- one run per attack (``simulate --attack M=KIND``): the 3 honest sites + site M attacking.

Distance = ||student_attack - student_honest|| / ||student_honest - student_init|| after the
last round (how far the attacker moved the model, relative to how far honest training moved it).

    .venv/bin/python benchmarks/bench_robustness.py --write docs/benchmarks.md
    .venv/bin/python benchmarks/bench_robustness.py --modes mean --attacks signflip --rounds 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from markdown_section import replace_section  # sibling: benchmarks/ is sys.path[0] as a script

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SECTION = "## Robustness to one attacking site"
MODES = ("mean", "clipped_mean", "median", "trimmed_mean")
ATTACKS = ("replace", "inflate", "signflip", "boost", "noise", "nan", "stale")
HONEST = (("ct", 2, 0, 1), ("xr", 0, 4, 2), ("both", 1, 2, 3))
ATTACKER = ("M", 1, 3, 4)


def _heading(exchange: tuple[str, str]) -> str:
    if exchange == ("fp32", "fp32"):
        return SECTION
    return f"{SECTION}, exchange down={exchange[0]} up={exchange[1]}"


def _config(root: Path, mode: str, local_steps: int, exchange: tuple[str, str]) -> Path:
    body = {"recipe": str(REPO / "configs" / "pretrain" / "micro.yaml"),
            "recipe_overrides": {"ssl": {"steps_per_epoch": 2, "batch_size_2d": 4,
                                         "batch_size_3d": 1, "threads": 1}},
            "local_steps": local_steps, "round_timeout": 900,
            "min_sites": 3 if exchange[1] == "secure" else 2,  # secure needs 3
            "evaluate": False, "poll_interval": 0.05, "aggregation": mode,
            "trim_fraction": 0.25,  # with 4 sites: drop the top and bottom value per coordinate
            "exchange": {"down": exchange[0], "up": exchange[1]}}
    path = root / f"fed-{mode}.yaml"
    path.write_text(json.dumps(body))
    return path


def _run(cfg: Path, sites: dict[str, Path], rounds: int, out: Path,
         attacks: dict[str, str] | None = None, init: dict | None = None
         ) -> tuple[dict, list[dict], str | None]:
    """(the last round's global state, the round rows, why the run stopped early or None).

    A run that stops (a secure round whose aggregate fails its checks) keeps the last complete
    round's state: the model the federation is left with."""
    from aggregator.rounds import RoundFailed
    from aggregator.simulate_cli import simulate
    from fed_unimiss.checkpoint import load_checkpoint

    stopped = None
    try:
        simulate(cfg, list(sites.items()), rounds, out, attacks=attacks)
    except RoundFailed as e:
        stopped = str(e)
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()] \
        if (out / "rounds.jsonl").is_file() else []
    if not rows:
        assert init is not None, stopped
        return init, rows, stopped
    state, _ = load_checkpoint(out / f"global_round_{len(rows):04d}")
    return state, rows, stopped


def _student_distance(a: dict, b: dict, init: dict) -> float:
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a
              if k.startswith("student."))
    den = sum(float((b[k].double() - init[k].double()).pow(2).sum()) for k in b
              if k.startswith("student."))
    return math.sqrt(num / den)


def _flagged(rows: list[dict], label: str) -> int:
    return sum(1 for r in rows
               if (r.get("decisions", {}).get(label, {}).get("action") in ("clipped", "rejected")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=ATTACKS)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--local-steps", type=int, default=4)
    ap.add_argument("--exchange", default="fp32,fp32", metavar="DOWN,UP",
                    help="how states travel (configs/federation/micro.yaml ships q8_delta,q8_delta); "
                         "each exchange has its own section")
    ap.add_argument("--write", type=Path, help="update this markdown file's section")
    args = ap.parse_args()
    args.exchange = tuple(args.exchange.split(","))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.basicConfig(level=logging.ERROR)
    import torch

    from aggregator.rounds import initial_state
    from fed_unimiss.data.phantom import write_phantoms

    torch.set_num_threads(1)
    results: dict = {"modes": {}, "rounds": args.rounds, "local_steps": args.local_steps}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sites = {}
        for name, ct, xr, seed in (*HONEST, ATTACKER):
            write_phantoms(root / "data" / name, n_ct=ct, n_xray=xr, seed=seed)
            sites[name] = root / "data" / name
        honest = {k: v for k, v in sites.items() if k != ATTACKER[0]}
        init = None
        for mode in args.modes:
            cfg = _config(root, mode, args.local_steps, args.exchange)
            if init is None:
                from aggregator.rounds import FederationRun

                run = FederationRun.from_files(cfg, root / "x", args.rounds)
                init = initial_state(run.recipe, args.rounds * args.local_steps)
            ref, ref_rows, _ = _run(cfg, honest, args.rounds, root / f"{mode}-honest3")
            _, rows4, _ = _run(cfg, sites, args.rounds, root / f"{mode}-honest4")
            floor = 0.0
            if args.exchange[1] == "secure":  # fresh round ids, so fresh rounding noise
                again, _, _ = _run(cfg, honest, args.rounds, root / f"{mode}-honest3-again")
                floor = _student_distance(again, ref, init)
            entry = {"loss3": [r["loss"] for r in ref_rows], "loss4": [r["loss"] for r in rows4],
                     "honest_flagged": {s: _flagged(rows4, s) for s in sites},
                     "medians": [r["screening"].get("median_norm") for r in rows4],
                     "vs_median": [{s: d.get("vs_median") for s, d in r["decisions"].items()}
                                   for r in rows4],
                     "cosine": [{s: d.get("cosine") for s, d in r["decisions"].items()}
                                for r in rows4],
                     "norms": [{s: d.get("norms") for s, d in r["decisions"].items()}
                               for r in rows4],
                     "max_update_norm": rows4[0]["screening"]["max_update_norm"],
                     "floor": floor,
                     "part_bounds": [r["screening"].get("part_bounds") for r in rows4],
                     "mean_norms": [r["screening"].get("mean_update_norm") for r in rows4],
                     "attacks": {}}
            for kind in args.attacks:
                with contextlib.redirect_stdout(sys.stderr):
                    state, rows, stopped = _run(cfg, sites, args.rounds,
                                                root / f"{mode}-{kind}", {ATTACKER[0]: kind}, init)
                entry["attacks"][kind] = {
                    "distance": _student_distance(state, ref, init),
                    "attacker_flagged": _flagged(rows, ATTACKER[0]),
                    "completed_rounds": len(rows), "stopped": stopped,
                    "honest_flagged": sum(_flagged(rows, s) for s in honest),
                    "reasons": sorted({r["decisions"].get(ATTACKER[0], {}).get("reason", "")
                                       for r in rows}),
                    "mean_norms": [r["screening"].get("mean_update_norm") for r in rows],
                }
                print(mode, kind, entry["attacks"][kind], flush=True)
            results["modes"][mode] = entry
            print(mode, "honest loss", entry["loss3"], entry["loss4"], entry["honest_flagged"],
                  flush=True)
    results["seconds"] = time.time() - t0
    print(json.dumps(results, indent=1))
    if args.write:
        replace_section(args.write, _heading(args.exchange), _markdown(results, args))


def _markdown(res: dict, args: argparse.Namespace) -> str:
    modes = list(res["modes"])
    lines = [_heading(args.exchange), "",
             f"`{' '.join(['.venv/bin/python', 'benchmarks/bench_robustness.py'] + sys.argv[1:])}`"
             f" on {platform.node() or 'this machine'} (2 shared CPU cores, OMP_NUM_THREADS=1), "
             f"{res['seconds'] / 60:.1f} min. Micro federation (local_steps "
             f"{res['local_steps']}, batches 4/1, 2-step epochs), {res['rounds']} rounds, "
             "phantom sites ct (2 CT), xr (4 X-rays), both (1 CT + 2 X-rays); attacker M "
             "(1 CT + 3 X-rays). Default checks on (count bound, the recipe's Adam norm bound, "
             "norm_factor 5, min_cosine -0.1, replay); trimmed_mean with trim_fraction 0.25. "
             f"Exchange down={args.exchange[0]} up={args.exchange[1]}.",
             "",
             "Distance = ||student(attack) - student(honest)|| / ||student(honest) - "
             "student(init)|| after the last round, against the same mode's 3-site honest run "
             f"(0 = the attacker had no effect). In brackets: rounds (of {res['rounds']}) in which "
             "the attacker was clipped or rejected.", "",
             "| attack | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    for kind in next(iter(res["modes"].values()))["attacks"]:
        cells = []
        for m in modes:
            a = res["modes"][m]["attacks"][kind]
            cell = f"{a['distance']:.3g} ({a['attacker_flagged']}/{res['rounds']})"
            if a.get("stopped"):
                cell += f"; run stopped after {a['completed_rounds']} round(s): " \
                        + _stop_reason(a["stopped"])
            cells.append(cell)
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines += ["", "Honest runs, training loss per round (sample-weighted mean of site losses); "
              "honest sites clipped or rejected in the 4-site honest run:", "",
              "| mode | 3 sites | 4 sites | honest sites flagged (4 sites) |", "|---|---|---|---|"]
    for m in modes:
        e = res["modes"][m]
        fl = ", ".join(f"{s} {n}" for s, n in e["honest_flagged"].items())
        lines.append(f"| {m} | {' '.join(f'{x:.3f}' for x in e['loss3'])} | "
                     f"{' '.join(f'{x:.3f}' for x in e['loss4'])} | {fl} |")
    mean = res["modes"].get("mean") or next(iter(res["modes"].values()))
    if args.exchange[1] == "secure":
        return "\n".join(lines + ["", _secure_note(mean)])
    ratios = [v[p] for r in mean["vs_median"] for v in r.values() if v
              for p in v if v[p] is not None]
    cosines = [v[p] for r in mean["cosine"] for v in r.values() if v for p in v]
    student = [v["student"] for r in mean["norms"] for v in r.values() if v]
    lines += ["", f"Honest 4-site run ({'mean' if 'mean' in res['modes'] else modes[0]}): "
              f"update norm / round median {min(ratios):.2f}-{max(ratios):.2f}; teacher cosine to "
              f"the other replies' median update {min(cosines):.3f}-{max(cosines):.3f}; "
              "student update norms "
              f"{min(student):.3f}-{max(student):.3f} against the Adam bound "
              f"{mean['max_update_norm']:.3g} per part."]
    return "\n".join(lines)


def _stop_reason(text: str) -> str:
    """The gist of a RoundFailed message for a table cell."""
    if "exceeds the bound" in text:
        return "the aggregate exceeded one honest update's bound"
    if "not finite" in text:
        return "the aggregate was not finite"
    return text.split(": ", 2)[-1].split(";")[0]


def _secure_note(entry: dict) -> str:
    """Under secure aggregation: the honest aggregate's norm against its refusal bound."""
    ratios = [norms[p] / bounds[p] for norms, bounds in zip(entry["mean_norms"],
                                                             entry["part_bounds"], strict=True)
              if norms and bounds for p in norms if bounds.get(p)]
    return (f"The same honest 3-site run repeated is at distance {entry['floor']:.3g} from the "
            "first: secure rounds draw fresh rounding noise (every run has its own round ids), "
            "so distances below this are noise. Honest 4-site run: the unmasked mean update's norm per part is "
            f"{min(ratios):.3f}-{max(ratios):.3f} of the bound one honest update obeys (above it "
            "the aggregate is refused and the run stops). Secure mode screens no single site: "
            "the aggregator sees counts and the sum, not who moved it.")


if __name__ == "__main__":
    main()
