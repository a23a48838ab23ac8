"""``fed-unimiss demo``: a whole federation on loopback, over real gRPC + TLS, on built-in data.

What it does, in the order a consortium would:

1. writes phantom data for three sites: A has CT only, B X-rays only, C both; A also holds a
   small labelled probe set (phantom CT with organ labels, ``probe:`` in its site.yaml);
2. provisions a CA, the coordinator's certificate and one key per site (``provision``);
3. starts the aggregator (SuperLink with TLS and site authentication) and three
   ``fed-unimiss site start`` processes, exactly as a coordinator and three hospitals would;
4. runs N rounds of federated pretraining of the ``micro`` model, streaming progress;
5. stops everything (no process is left behind) and prints, per round, every site's loss per
   kind of data (2D X-ray steps and 3D CT steps apart: their losses differ in scale, so a mix
   would hide the trend), writes ``demo.png`` (those losses per round, and each round's time
   split into training and coordination) and says where checkpoints, rounds.jsonl, the plot
   and the logs are. Every round site A probes the global teacher and student it received
   (k-NN and linear balanced accuracy of the organs, per encoder stage), and after the last
   round the demo probes the final global checkpoint on the same probe set: the table and the
   plot show that curve, which the SSL losses cannot (they are not comparable across rounds
   of a moving teacher, and one of them barely moves).

The demo's federation (:data:`DEMO_LOCAL_STEPS` local steps per round at the micro recipe's own
batch sizes, :data:`DEMO_ROUNDS` rounds) is sized so that the losses fall visibly within about
5 minutes on 2 CPU cores: every round costs tens of seconds of coordination (a fresh ClientApp
process per site, the data check, the exchange), so few rounds of many steps show more learning
than many rounds of few steps. Measured in docs/benchmarks.md, "The demo".

Every demo gets a fresh timestamped folder under ``--workdir``; nothing existing is touched or
deleted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["register", "DemoLayout", "prepare_demo", "run_demo", "write_federation_yaml", "SITES",
           "loss_table", "write_plot", "site_kind_losses", "round_times", "probe_table",
           "probe_curves", "PROBE_SITE"]

log = logging.getLogger(__name__)

# site -> (CT volumes, X-rays): one CT-only, one X-ray-only and one mixed hospital.
SITES: dict[str, tuple[int, int]] = {"A": (2, 0), "B": (0, 6), "C": (1, 3)}
DEMO_ROUNDS = 3
DEMO_LOCAL_STEPS = 80
# The micro recipe's own batches (8 X-rays, 2 CT tiles) and epochs of 10 steps: the CT loss did
# not fall in 300 steps at micro.yaml's federation batches (4 / 1), and did at these.
DEMO_RECIPE_OVERRIDES: dict[str, Any] = {"ssl": {"threads": 1}}
PLOT_NAME = "demo.png"
FINAL_PROBE_NAME = "final_probe.json"  # the final model's probe, as a rounds.jsonl probe entry
REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# The site holding a labelled probe set (phantom CT with organ labels), probed every round.
PROBE_SITE = "A"
# Lesion-free volumes, half to learn from, half scored. With 4 volumes (2 + 2) and the phantom's
# lesions (a few hundred voxels in half the volumes: whether a scored volume holds one changed
# the classes scored) the probe's round-to-round noise hid the change (docs/benchmarks.md).
PROBE_CT = 8
PROBE_CONFIG = REPO_CONFIGS / "probe" / "seg3d-micro.yaml"
# What the table and the plot show: the teacher (the network an export takes) at the two deepest
# encoder stages, k-NN and linear. Over recipe seeds stage 3's k-NN rose steadily with training,
# stage 4's rose more but jittered from round to round (docs/benchmarks.md); the student and
# the other stages are in rounds.jsonl and `aggregator status`.
PROBE_NETWORK = "teacher"
PROBE_STAGES_SHOWN = 2


@dataclass(frozen=True)
class DemoLayout:
    root: Path
    data: dict[str, Path]
    kits: Path
    federation: Path
    run: Path
    logs: Path
    probe: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_federation_yaml(
    path: Path, *, min_sites: int, round_timeout: float, local_steps: int = 2,
    evaluate: bool = False, recipe_overrides: dict[str, Any] | None = None,
    probe_every: int = 0,
) -> Path:
    """A federation config derived from configs/federation/micro.yaml, for loopback runs.

    The recipe path is made absolute (the file is written elsewhere); ``evaluate: false`` keeps
    one exchange per round, which halves the coordination overhead on 2 cores.
    ``recipe_overrides`` replaces micro.yaml's (None keeps them).
    """
    src = REPO_CONFIGS / "federation" / "micro.yaml"
    cfg = yaml.safe_load(src.read_text())
    recipe = Path(cfg.get("recipe", "../pretrain/micro.yaml"))
    cfg["recipe"] = str(recipe if recipe.is_absolute() else (src.parent / recipe).resolve())
    cfg.update(local_steps=local_steps, min_sites=min_sites, round_timeout=round_timeout,
               evaluate=evaluate, probe_every=probe_every)
    if recipe_overrides is not None:
        cfg["recipe_overrides"] = recipe_overrides
    path.write_text(f"# Derived from {src} by fed-unimiss (loopback run).\n"
                    + yaml.safe_dump(cfg, sort_keys=False))
    return path


def prepare_demo(workdir: Path, round_timeout: float = 300.0,
                 local_steps: int = DEMO_LOCAL_STEPS) -> DemoLayout:
    """Create a fresh demo folder with phantom data, kits and a federation config."""
    from aggregator.provision import provision
    from fed_unimiss.data.phantom import write_phantoms

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    root = Path(workdir).expanduser().resolve() / f"demo-{stamp}"
    suffix = 1
    while root.exists():
        root = root.with_name(f"demo-{stamp}-{suffix}")
        suffix += 1
    root.mkdir(parents=True)
    data = {}
    for i, (site, (n_ct, n_xray)) in enumerate(SITES.items()):
        data[site] = root / "data" / f"site-{site}"
        write_phantoms(data[site], n_ct, n_xray, seed=100 + i)
    kits = root / "kits"
    provision(list(SITES), kits, server_names=["127.0.0.1"])
    probe = root / "data" / f"probe-{PROBE_SITE}"
    write_phantoms(probe, PROBE_CT, 0, labels=True, seed=200, fmt="nifti", lesions=False)
    with open(kits / f"site-{PROBE_SITE}" / "site.yaml", "a") as f:
        f.write(f"# A labelled probe set: the site probes the global model on it (docs/site-guide.md)\n"
                f"probe: {{data: \"{probe}\", task: seg3d, config: \"{PROBE_CONFIG}\"}}\n")
    # min_sites one below the number of sites: a round still closes if one site drops
    federation = write_federation_yaml(root / "federation.yaml", min_sites=len(SITES) - 1,
                                       round_timeout=round_timeout, local_steps=local_steps,
                                       recipe_overrides=DEMO_RECIPE_OVERRIDES, probe_every=1)
    return DemoLayout(root=root, data=data, kits=kits, federation=federation,
                      run=root / "run", logs=root / "logs", probe=probe)


def _site_command(layout: DemoLayout, site: str, fleet: str) -> list[str]:
    return [sys.executable, "-m", "fed_unimiss.cli.main", "site", "start",
            "--kit", str(layout.kits / f"site-{site}"), "--data", str(layout.data[site]),
            "--superlink", fleet, "--state-dir", str(layout.root / "sites" / site / "state")]


def _num(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else "-"


def site_kind_losses(rows: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """``"A 3D" -> {round: loss}``: every site's mean loss per kind of step, per round."""
    out: dict[str, dict[int, float]] = {}
    for r in rows:
        for site, m in sorted((r.get("per_site") or {}).items()):
            for kind in ("2d", "3d"):
                value = m.get(f"loss_{kind}") if isinstance(m, dict) else None
                if isinstance(value, (int, float)):
                    out.setdefault(f"{site} {kind.upper()}", {})[int(r["round"])] = float(value)
    return dict(sorted(out.items()))


def round_times(rows: list[dict[str, Any]]) -> list[tuple[int, float, float]]:
    """(round, training s, coordination s): sites train in parallel, so the slowest site's
    training is the round's; the rest of the round is coordination (instructions, a fresh
    ClientApp process per site, data check, model set-up, replies, checks, averaging, saving)."""
    out = []
    for r in rows:
        secs = r.get("seconds")
        train = [m.get("seconds") for m in (r.get("per_site") or {}).values()
                 if isinstance(m, dict) and isinstance(m.get("seconds"), (int, float))]
        if isinstance(secs, (int, float)):
            t = min(max(train, default=0.0), secs)
            out.append((int(r["round"]), t, secs - t))
    return out


def loss_table(rows: list[dict[str, Any]]) -> str:
    """Rounds down, one column per site and kind, then the change from first to last round."""
    series = site_kind_losses(rows)
    rounds = [int(r["round"]) for r in rows]
    width = max([9, *(len(k) + 1 for k in series)])
    lines = ["loss per site and kind of data (2D = X-ray steps, 3D = CT steps):",
             f"{'round':>5}" + "".join(f"{k:>{width}}" for k in series)]
    for n in rounds:
        lines.append(f"{n:>5}" + "".join(f"{_num(series[k].get(n), '.3f'):>{width}}"
                                         for k in series))
    change = []
    for k in series:
        first, last = series[k].get(min(series[k])), series[k].get(max(series[k]))
        change.append(f"{(last - first) / first:+.0%}" if len(series[k]) > 1 and first else "-")
    lines.append(f"{'change':>5}" + "".join(f"{c:>{width}}" for c in change))
    times = round_times(rows)
    if times:
        lines.append("")
        lines.append(f"{'round':>5}  {'seconds':>7}  {'training':>8}  {'coordination':>12}  sites")
        by_round = {int(r["round"]): r for r in rows}
        for n, t, c in times:
            sites = ",".join(map(str, by_round[n].get("sites", [])))
            lines.append(f"{n:>5}  {t + c:>7.1f}  {t:>8.1f}  {c:>12.1f}  {sites}")
    return "\n".join(lines)


def probe_final_model(layout: DemoLayout) -> dict[str, Any] | None:
    """A probe-only row for the model after the last round: site A's probe set and config, run
    by the demo on the last global checkpoint. Round r probes the model after r - 1 rounds, so
    without this the model the demo ends with would go unprobed. None when no round completed.
    """
    import torch

    from aggregator.probe_report import probe_row, read_probe
    from fed_unimiss.checkpoint import load_checkpoint
    from fed_unimiss.federation import load_federation, resolve_recipe
    from fed_unimiss.probe.federated import probe_global_state, site_probe_config
    from fed_unimiss.probe.run import load_probe_data

    checkpoints = sorted(layout.run.glob("global_round_*.safetensors"))
    if not checkpoints:
        return None
    rounds_done = int(checkpoints[-1].stem.rsplit("_", 1)[1])
    recipe = resolve_recipe(load_federation(layout.federation), layout.federation)
    cfg = site_probe_config("seg3d", recipe, PROBE_CONFIG)
    tensors, _ = load_checkpoint(checkpoints[-1])
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        data = load_probe_data(cfg, layout.probe, layout.probe)
        scores = read_probe(probe_global_state(tensors, recipe.model, data, cfg))
    finally:
        torch.set_num_threads(threads)
    if scores is None:
        return None
    return {"round": rounds_done + 1, "final_probe": True,
            "probe": probe_row({PROBE_SITE: scores}, rounds_done + 1)}


def probe_curves(rows: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """``"knn stage4" -> {rounds trained: accuracy}``: the global teacher's balanced accuracy
    at the deepest encoder stages, weighted over the probing sites, per classifier."""
    from aggregator.probe_report import deepest_stages, probe_series

    out: dict[str, dict[int, float]] = {}
    for p in probe_series(rows):
        scores = (p["weighted"] or {}).get(PROBE_NETWORK)
        for stage, kinds in deepest_stages(scores, PROBE_STAGES_SHOWN).items():
            for kind in ("knn", "linear"):
                value = kinds.get(kind)
                if isinstance(value, (int, float)) and isinstance(p["after_rounds"], int):
                    out.setdefault(f"{kind} stage{stage}", {})[p["after_rounds"]] = float(value)
    return out


def probe_table(rows: list[dict[str, Any]]) -> str:
    """The global teacher's probe per round: after how many rounds, k-NN and linear balanced
    accuracy of the two deepest stages (:func:`probe_curves`)."""
    curves = probe_curves(rows)
    if not curves:
        return "probe: no site reported one"
    lines = [f"probe of the global {PROBE_NETWORK} at site {PROBE_SITE} (organ balanced accuracy "
             "on the frozen encoder; chance 0.2):",
             f"{'after rounds':>12}" + "".join(f"{k:>16}" for k in curves)]
    for n in sorted({r for c in curves.values() for r in c}):
        lines.append(f"{n:>12}" + "".join(f"{_num(c.get(n), '.3f'):>16}" for c in curves.values()))
    final = [r["probe"]["after_rounds"] for r in rows if r.get("final_probe")]
    if final:
        lines.append(f"(after {final[0]} rounds: the final model, probed by the demo on the last "
                     f"checkpoint with site {PROBE_SITE}'s probe set; the other rows are site "
                     f"{PROBE_SITE}'s own probes, each before it trained that round)")
    return "\n".join(lines)


def write_plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """``path``: loss per round per site and kind (2D and 3D panels: different scales), and each
    round's time split into training and coordination. None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    series = site_kind_losses(rows)
    times = round_times(rows)
    if not series and not times:
        return None
    probe = probe_curves(rows)
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    sites = sorted({name.split()[0] for name in series})
    colour = {site: f"C{i}" for i, site in enumerate(sites)}  # one colour per site, both panels
    for ax, kind, title in ((axes[0], "2D", "2D loss (X-ray steps)"),
                            (axes[1], "3D", "3D loss (CT steps)")):
        for name, values in series.items():
            if name.endswith(kind):
                xs = sorted(values)
                ax.plot(xs, [values[x] for x in xs], marker="o", label=f"site {name[:-3]}",
                        color=colour[name[:-3]])
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.set_ylabel("mean loss of the round's local steps")
        ax.xaxis.get_major_locator().set_params(integer=True)
        if ax.lines:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no site trained this kind", ha="center", transform=ax.transAxes)
    ax = axes[2]
    xs = [n for n, _, _ in times]
    ax.bar(xs, [t for _, t, _ in times], label="training (slowest site)", color="0.35")
    ax.bar(xs, [c for _, _, c in times], bottom=[t for _, t, _ in times],
           label="coordination", color="0.75")
    ax.set_title("round time")
    ax.set_xlabel("round")
    ax.set_ylabel("seconds")
    ax.set_xticks(xs)
    if times:  # room above the bars for the legend
        ax.set_ylim(0, 1.35 * max(t + c for _, t, c in times))
    ax.legend(loc="upper right")
    ax = axes[3]
    stages = sorted({name.split()[1] for name in probe}, reverse=True)
    for name, values in probe.items():
        xs = sorted(values)
        ax.plot(xs, [values[x] for x in xs], marker="o", label=name,
                color=f"C{stages.index(name.split()[1])}",
                linestyle="-" if name.startswith("knn") else "--")
    ax.set_title(f"probe of the global {PROBE_NETWORK} (site {PROBE_SITE})")
    final = any(r.get("final_probe") for r in rows)
    ax.set_xlabel("rounds trained" + (" (the last: the final checkpoint)" if final else ""))
    ax.set_ylabel("organ balanced accuracy")
    ax.xaxis.get_major_locator().set_params(integer=True)
    if probe:  # room above the curves for the legend
        values = [v for c in probe.values() for v in c.values()]
        low, high = min(values), max(values)
        ax.set_ylim(low - 0.02, high + 0.45 * (high - low) + 0.03)
        ax.legend(loc="upper left", ncol=2, fontsize="small")
    else:
        ax.text(0.5, 0.5, "no probe reported", ha="center", transform=ax.transAxes)
    fig.suptitle("fed-unimiss demo: 3 sites on loopback (A: CT, B: X-ray, C: both)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _final_probe_rows(layout: DemoLayout) -> list[dict[str, Any]]:
    """[the probe-only row of the final model], or [] when it cannot be had: it is an extra,
    the demo's outcome stands without it."""
    print(f"probing the final global model on site {PROBE_SITE}'s probe set ...", flush=True)
    try:
        row = probe_final_model(layout)
    except Exception:  # noqa: BLE001 - the rounds' own probes are already printed
        log.exception("the probe of the final global model failed")
        return []
    if row is None:
        return []
    (layout.root / FINAL_PROBE_NAME).write_text(json.dumps(row, indent=1) + "\n")
    return [row]


def run_demo(workdir: Path, rounds: int, round_timeout: float = 300.0,
             local_steps: int = DEMO_LOCAL_STEPS) -> int:
    """Run the demo; returns the exit code (0 when every round completed)."""
    from aggregator.cli import format_round
    from aggregator.deploy.control import ControlError
    from aggregator.deploy.runner import AggregatorOptions, run_aggregator
    from flower_layer.processes import ProcessSet

    t0 = time.monotonic()
    print(f"preparing phantom data and kits for sites {', '.join(SITES)} ...", flush=True)
    layout = prepare_demo(workdir, round_timeout, local_steps)
    fleet = f"127.0.0.1:{free_port()}"
    control = f"127.0.0.1:{free_port()}"
    opts = AggregatorOptions(
        kit=layout.kits / "coordinator", config=layout.federation, rounds=rounds,
        out=layout.run, fleet_address=fleet, control_address=control,
        wait_for_sites=len(SITES),
    )
    with ProcessSet(layout.root / "pids") as sites:
        def start_sites() -> None:
            for site in SITES:
                sites.start(f"site-{site}", _site_command(layout, site, fleet),
                            layout.logs / f"site-{site}.log")
            print(f"started {len(SITES)} site processes; waiting for them to connect ...",
                  flush=True)

        try:
            outcome = run_aggregator(
                opts,
                on_ready=start_sites,
                on_started=lambda rid: print(f"run {rid} started: {rounds} round(s)", flush=True),
                on_round=lambda row, st: print(format_round(row, rounds, st), flush=True),
                on_note=lambda text: print(text, flush=True),
            )
        except ControlError as e:
            print(f"error: {e}\nsite logs: {layout.logs}", file=sys.stderr)
            return 1
    print()
    print(loss_table(outcome.rounds))
    print()
    rows = outcome.rounds + _final_probe_rows(layout)
    print(probe_table(rows))
    print()
    plot = write_plot(rows, layout.root / PLOT_NAME)
    elapsed = time.monotonic() - t0
    checkpoints = sorted(layout.run.glob("global_round_*.safetensors"))
    print(f"demo folder:    {layout.root}")
    print(f"checkpoints:    {layout.run} ({len(checkpoints)} file(s), last: "
          f"{checkpoints[-1].name if checkpoints else 'none'})")
    print(f"rounds.jsonl:   {layout.run / 'rounds.jsonl'} (the final model's probe: "
          f"{layout.root / FINAL_PROBE_NAME})")
    print(f"plot:           {plot if plot else 'none (no round completed)'}")
    print(f"logs:           {layout.run / 'logs'} (aggregator), {layout.logs} (sites), "
          f"{layout.root / 'sites'}/*/state/logs (SuperNodes)")
    print(f"total time:     {elapsed:.0f} s")
    if not outcome.ok:
        print(f"error: {outcome.error}", file=sys.stderr)
        return 1
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.rounds < 1:
        print("error: --rounds must be at least 1", file=sys.stderr)
        return 2
    if args.local_steps < 1:
        print("error: --local-steps must be at least 1", file=sys.stderr)
        return 2
    return run_demo(Path(args.workdir), args.rounds, args.round_timeout, args.local_steps)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="a whole federation on loopback with built-in data",
        description="Phantom data for three sites (CT only, X-ray only, both), a provisioned "
        "CA and kits, the aggregator and three site processes over gRPC with TLS and site "
        "authentication on 127.0.0.1, N rounds of the micro model, then a clean shutdown.",
    )
    p.add_argument("--workdir", default="demo-run",
                   help="parent folder; each demo writes a new demo-YYYYmmdd-HHMMSS inside")
    p.add_argument("--rounds", type=int, default=DEMO_ROUNDS,
                   help=f"federated rounds (default {DEMO_ROUNDS}; each round adds its training, "
                   "site A's probe and its coordination time: docs/benchmarks.md, 'The demo')")
    p.add_argument("--local-steps", type=int, default=DEMO_LOCAL_STEPS,
                   help=f"training steps per site per round (default {DEMO_LOCAL_STEPS}; fewer "
                   "steps are faster but show less learning)")
    p.add_argument("--round-timeout", type=float, default=300.0,
                   help="seconds a round waits for replies before closing without a site")
    p.set_defaults(func=_run)
