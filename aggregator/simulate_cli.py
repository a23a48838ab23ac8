"""``fed-unimiss simulate``: a whole federation in one process (real ServerApp and ClientApps).

    fed-unimiss simulate --config configs/federation/micro.yaml \\
        --site A=/data/siteA --site B=/data/siteB --rounds 2 --out runs/sim1 [--resume] \
        [--attack B=signflip]

Sites get node ids 1..N in the order given and keep their state in ``OUT/sites/NAME``.
RUN gets ``global_round_NNNN.safetensors/.json`` and ``rounds.jsonl``. ``--attack NAME=KIND``
makes site NAME misbehave (replace, inflate, signflip, noise, nan, stale; see
aggregator/attacks.py); each round's ``decisions`` in rounds.jsonl say what the aggregator did
with it. With ``exchange.up: secure`` every simulated site gets an identity key
(``OUT/sites/NAME/site.key``) and the run a roster (``OUT/roster/``), as provisioning would.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from fed_unimiss import exchange as ex
from fed_unimiss.cli.runtime_args import add_runtime_arguments, runtime_from_args
from fed_unimiss.config import ConfigError

__all__ = ["register", "parse_site", "simulate"]

log = logging.getLogger(__name__)


def parse_site(text: str, flag: str = "--site") -> tuple[str, Path]:
    """``NAME=DIR`` -> (name, dir); argparse turns the ValueError into a usage error."""
    from aggregator.validation import site_label

    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"{flag} {text!r}: expected NAME=DIR, e.g. A=/data/siteA")
    if site_label(name, 0) != name:
        raise argparse.ArgumentTypeError(
            f"{flag} {text!r}: NAME must be letters, digits, '_', '.' or '-' (at most "
            f"{ex.MAX_SITE_NAME_LEN} characters)"
        )
    return name, Path(folder)


# simulate's DP flags, each a dp-* node config key of the sites (docs/privacy.md).
DP_FLAGS = {
    "dp-epsilon": "turn DP on with this target epsilon per patient",
    "dp-delta": "target delta (default 1e-5)",
    "dp-clip": "per-patient gradient clip (default 1.0)",
    "dp-planned-rounds": "rounds the DP budget is calibrated for (default 10)",
    "dp-patients-per-step": "expected patients per DP step (default 4)",
}


def site_dp_configs(config: Path, names: list[str],
                    flags: dict[str, list[str]]) -> dict[str, dict[str, object]]:
    """dp-* node config per site: the YAML's ``site_privacy``, then ``--dp-*`` flags on top."""
    from fed_unimiss.federation import load_federation

    base = dict(load_federation(config).site_privacy or {})
    out = {name: dict(base) for name in names}
    for key, values in flags.items():
        for text in values:
            name, sep, value = text.rpartition("=")
            targets = [name] if sep else names
            if sep and name not in out:
                raise ValueError(f"--{key} {text!r}: no site named {name!r} (sites: "
                                 f"{', '.join(names)})")
            try:
                number = float(value)
            except ValueError as e:
                raise ValueError(f"--{key} {text!r}: {value!r} is not a number") from e
            for target in targets:
                out[target][key] = number
    return out


def simulated_roster(out: Path, names: list[str]) -> tuple[Path, dict[str, dict[str, str]]]:
    """Identity keys and a roster for simulated sites (``exchange.up: secure``), as provisioning
    makes them: ``OUT/sites/NAME/site.key`` and ``OUT/roster/NAME.pub``; existing keys are kept
    (a resumed run). Returns the roster folder and each site's node config."""
    from aggregator.provision import _new_key, _ssh_private, _ssh_public
    from fed_unimiss.checkpoint import atomic_write_bytes

    roster = out / "roster"
    roster.mkdir(parents=True, exist_ok=True)
    node_config = {}
    for name in names:
        key_path = out / "sites" / name / "site.key"
        if not key_path.is_file() or not (roster / f"{name}.pub").is_file():
            key = _new_key()
            key_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(key_path, _ssh_private(key), mode=0o600)
            atomic_write_bytes(roster / f"{name}.pub", _ssh_public(key, f"simulated-{name}"))
        node_config[name] = {ex.NODE_IDENTITY_KEY: str(key_path), ex.NODE_ROSTER: str(roster)}
    return roster, node_config


def simulate(config: Path, sites: list[tuple[str, Path]], rounds: int, out: Path,
             resume: bool = False, grid_cls: type | None = None,
             dp_flags: dict[str, list[str]] | None = None,
             attacks: dict[str, str] | None = None,
             runtime: dict[str, object] | None = None,
             probes: dict[str, dict[str, str]] | None = None) -> None:
    """Run the federation in-process; ``grid_cls`` lets tests inject faults into the transport.

    ``attacks`` (site name -> kind) runs those sites as attackers
    (:class:`aggregator.attacks.AttackGrid`); it cannot be combined with ``grid_cls``.
    ``runtime`` is every simulated site's hardware as node config (``Runtime.to_node_config``).
    ``probes`` (site name -> probe-* node config, :func:`fed_unimiss.exchange.probe_node_config`)
    gives those sites
    a labelled probe set.
    """
    from aggregator.deploy.fab import CLIENTAPP
    from aggregator.inprocess import InProcessGrid, SiteSpec, load_component, run_inprocess
    from aggregator.server_app import app as server_app

    # The ClientApp is loaded by its component reference, as a SuperNode would: the aggregator
    # package never imports the site package.
    client_app = load_component(CLIENTAPP)

    from fed_unimiss.federation import load_federation

    out = out.resolve()
    names = [name for name, _ in sites]
    dp = site_dp_configs(config, names, dp_flags or {})
    run_config: dict[str, object] = {}
    secure: dict[str, dict[str, str]] = {}
    if load_federation(config).exchange.masked:
        roster, secure = simulated_roster(out, names)
        run_config[ex.RUN_ROSTER] = str(roster)
    specs = [SiteSpec(name, folder.resolve(),
                      {**(runtime or {}), **dp[name], **(probes or {}).get(name, {}),
                       **secure.get(name, {})})
             for name, folder in sites]
    if attacks:
        from aggregator.attacks import AttackGrid

        if grid_cls is not None:
            raise ValueError("attacks and grid_cls cannot be combined")
        grid = AttackGrid(client_app, specs, out / "sites", attacks)
    else:
        grid = (grid_cls or InProcessGrid)(client_app, specs, out / "sites")
    run_config.update({ex.RUN_CONFIG: str(config.resolve()), ex.RUN_OUT: str(out),
                       ex.RUN_ROUNDS: rounds, ex.RUN_RESUME: resume})
    run_inprocess(server_app, grid, run_config)


def _run(args: argparse.Namespace) -> int:
    from aggregator.rounds import RoundFailed
    from aggregator.run_store import ResumeError

    names = [name for name, _ in args.site]
    if len(set(names)) != len(names):
        print(f"error: site names must be unique, got {names}")
        return 2
    for name, folder in args.site:
        if not folder.is_dir():
            print(f"error: --site {name}={folder}: not a folder")
            return 2
    try:
        runtime = runtime_from_args(args)
        for name, folder in args.probe or []:
            if name not in names or not folder.is_dir():
                print(f"error: --probe {name}={folder}: " + ("not a folder" if name in names
                      else f"no site named {name!r}"))
                return 2
        probes = {name: ex.probe_node_config(folder, args.probe_task, args.probe_config)
                  for name, folder in args.probe or []}
        simulate(args.config, args.site, args.rounds, args.out, args.resume,
                 dp_flags={k: getattr(args, k.replace("-", "_")) or [] for k in DP_FLAGS},
                 attacks=dict(args.attack or []), runtime=runtime.to_node_config(),
                 probes=probes)
    except (ConfigError, ResumeError, RoundFailed, ValueError) as e:
        print(f"error: {e}")
        return 1
    print(f"done: {args.rounds} round(s); checkpoints and rounds.jsonl in {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="run a federation in one process (no sockets)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, required=True,
                   help="federation YAML (configs/federation/micro.yaml for a quick run)")
    p.add_argument("--site", type=parse_site, action="append", required=True, metavar="NAME=DIR",
                   help="a site and its image folder; repeat for each site")
    p.add_argument("--rounds", type=int, required=True,
                   help="rounds to run; part of the schedule, so keep it when resuming")
    p.add_argument("--out", type=Path, required=True,
                   help="RUN directory for checkpoints and rounds.jsonl (a new one per run)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out after its last complete round")
    add_runtime_arguments(p)
    p.add_argument("--workers", dest="nproc", type=int, default=1, metavar="N",
                   help="data-parallel processes per simulated site and round (not with DP)")
    for key, what in DP_FLAGS.items():  # differential privacy per site
        p.add_argument(f"--{key}", action="append", metavar="[NAME=]VALUE",
                       help=f"{what}; VALUE for every site or NAME=VALUE for one (repeatable); "
                            "overrides the federation YAML's site_privacy")
    p.add_argument("--attack", type=_parse_attack, action="append", metavar="NAME=KIND",
                   help="make site NAME misbehave: replace, inflate, signflip, noise, nan or "
                        "stale (aggregator/attacks.py); check the config's defences before a "
                        "real run: rounds.jsonl 'decisions' name what was done with it")
    p.add_argument("--probe", type=lambda text: parse_site(text, "--probe"), action="append",
                   metavar="NAME=DIR",
                   help="site NAME holds the labelled probe set DIR (a folder `fed-unimiss "
                   "probe` reads); probed every probe_every rounds of the federation YAML")
    p.add_argument("--probe-task", choices=("seg3d", "seg2d", "cls3d", "cls2d"), default="seg3d",
                   help="task of the --probe sets (default seg3d)")
    p.add_argument("--probe-config", type=Path, default=None, metavar="YAML",
                   help="ProbeConfig of the --probe sets (configs/probe/*.yaml; default: the "
                   "recipe's input sizes and spacing)")
    p.set_defaults(func=_run)


def _parse_attack(text: str) -> tuple[str, str]:
    from aggregator.attacks import parse_attack

    return parse_attack(text)
