"""Bytes on the wire and aggregator cost of one federated round.

1. Bytes per site per round, both directions, for the micro, tiny and small presets: the real
   instruction and reply records (ArrayRecord of student + teacher + center, config/metric
   records) built by the aggregator's and the site's own code, measured with Flower's
   ``count_bytes`` (serialized array payload + keys; gRPC framing adds well under 1%).
2. Aggregation time and peak memory of the aggregator for 2, 8 and 32 sites: two real rounds
   through the in-process grid, the real strategy (validation + dimension-aware running mean) and
   a ClientApp that answers instantly with the global state plus noise, so the time measured is
   the aggregator's (deserialise, validate, fold, finalise). Each site count runs in a fresh
   subprocess; peak memory is that process's max RSS above its RSS just before the round.

    .venv/bin/python benchmarks/bench_federation.py --write docs/benchmarks.md
    .venv/bin/python benchmarks/bench_federation.py --presets micro --sites 2 8   # quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from markdown_section import replace_section  # sibling: benchmarks/ is sys.path[0] as a script

SECTION = "## Federation"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _reset_peak_rss_mb() -> float:
    """Reset the kernel's peak-RSS mark (VmHWM) to now and return the current RSS.

    ``ru_maxrss`` never goes down, so a peak reached before the round (building the model
    state) would be counted as the round's; ``/proc/self/clear_refs`` 5 resets VmHWM (Linux).
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_mb("VmRSS")


def _peak_rss_mb() -> float:
    return _status_mb("VmHWM") or _rss_mb()


def _current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _exchange_state(preset: str) -> dict:
    """student.*, teacher.*, center of ``preset`` (teacher shares the student's tensors)."""
    import torch

    from fed_unimiss.models import create_model, get_config

    net = create_model(preset)
    state = {f"student.{k}": v.detach() for k, v in net.state_dict().items()}
    state.update({f"teacher.{k}": v.detach() for k, v in net.state_dict().items()})
    state["center"] = torch.zeros(1, get_config(preset).head_out_dim)
    return state


def bytes_one(preset: str) -> dict:
    """Instruction and reply size of one site in one round (in this process)."""
    from flwr.app import ConfigRecord, MetricRecord

    from aggregator.exchange_records import to_record
    from fed_unimiss import exchange as ex

    state = _exchange_state(preset)
    arrays = to_record(state).count_bytes()  # fp32: one array per tensor
    config = ConfigRecord({ex.RECIPE_JSON: "x" * 2500, ex.ROUND: 1, ex.NUM_ROUNDS: 10,
                           ex.LOCAL_STEPS: 4, ex.START_STEP: 0, ex.TOTAL_STEPS: 40,
                           ex.EVAL_BATCHES: 1}).count_bytes()
    metrics = MetricRecord({k: 1.0 for k in (*ex.COUNT_METRICS, *ex.TRAIN_METRICS)}).count_bytes()
    label = ConfigRecord({ex.SITE_NAME_KEY: "site-A"}).count_bytes()
    params = sum(t.numel() for t in state.values())
    return {"preset": preset, "tensors": len(state), "params": params,
            "down": arrays + config, "up": arrays + metrics + label}


def aggregate_one(sites: int, preset: str, exchange: str = "fp32,fp32",
                  min_cosine: float | None = -0.1) -> dict:
    """Two real rounds with ``sites`` instant sites; aggregator time and peak memory per round.

    ``exchange`` is ``DOWN,UP`` (e.g. ``q8_delta,q8_delta``). Two rounds, because with
    ``down: q8_delta`` round 1 sends the bf16 base and round 2 the int8 delta, the steady
    state. The instant site builds its reply one tensor at a time (decode, add noise, encode),
    so the process's peak is the aggregator's: the instruction and the replies as received,
    plus what the aggregator itself holds (with ``down: q8_delta`` that includes the base).
    """
    import tempfile

    import torch
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from aggregator.inprocess import InProcessGrid, SiteSpec
    from aggregator.rounds import FederationRun, run_federation
    from fed_unimiss import exchange as ex
    from fed_unimiss import exchange_codec as codec

    down, up = exchange.split(",")
    torch.set_num_threads(1)
    state = {k: v.clone() for k, v in _exchange_state(preset).items()}
    app = ClientApp()
    client_seconds, client_cpu = [0.0], [0.0]

    def received(msg: Message) -> list[tuple[str, object]]:
        """(name, thunk -> fp32 tensor) of the state as sent, one tensor at a time."""
        got = msg.content.array_records[ex.ARRAYS]
        config = msg.content.config_records[ex.CONFIG]
        if codec.PACKED not in got:  # fp32: one array per tensor
            return [(k, lambda k=k: torch.from_numpy(got[k].numpy())) for k in list(got.keys())]
        items = codec.layout_from_json(config[ex.EXCHANGE_LAYOUT])
        flat = torch.from_numpy(got[codec.PACKED].numpy())
        if down == "q8_delta":  # an instant site keeps no base (it would count as the
            # aggregator's memory here): its int8 reply is noise whatever the base holds
            return [(k, lambda shape=shape: torch.zeros(shape)) for k, shape in items]
        tensors, start = [], 0
        for name, shape in items:  # one tensor at a time, like the aggregator
            n = math.prod(shape)
            tensors.append((name, lambda s=start, n=n, shape=shape, name=name: codec.decode_tensor(
                name, flat[s:s + n].view(shape), down, shape)))
            start += n
        return tensors

    @app.train()
    def train(msg: Message, context) -> Message:
        t, c = time.perf_counter(), time.process_time()
        tensors = received(msg)
        arrays, scales = {}, {}
        if up == "fp32":
            for name, value in tensors:
                v = value()
                arrays[name] = Array((v + 1e-3 * torch.randn_like(v)).numpy())
        else:  # the packed update, one tensor at a time (a real site packs the whole state)
            parts_v, parts_s = [], []
            for _name, value in sorted(tensors):
                v = value()
                if up == "q8_delta":
                    q, s = codec.quantise(1e-3 * torch.randn_like(v))
                    parts_v.append(q)
                    parts_s.append(s)
                else:
                    parts_v.append(codec.encode_tensor(v + 1e-3 * torch.randn_like(v), up)
                                   .reshape(-1))
            arrays[codec.PACKED] = Array(torch.cat(parts_v).numpy())
            del parts_v
            if parts_s:
                scales[codec.PACKED] = Array(torch.cat(parts_s).numpy())
        s2, s3 = (8, 2) if context.node_id % 3 else (8, 0)
        content = RecordDict({
            ex.ARRAYS: ArrayRecord(arrays),
            ex.METRICS: MetricRecord({ex.SAMPLES_2D: s2, ex.SAMPLES_3D: s3, ex.LOSS: 1.0}),
            ex.SITE: ConfigRecord({ex.SITE_NAME_KEY: f"s{context.node_id}"})})
        if scales:
            content[ex.SCALES] = ArrayRecord(scales)
        reply = Message(content, reply_to=msg)
        client_seconds[0] += time.perf_counter() - t
        client_cpu[0] += time.process_time() - c
        return reply

    marks: list[tuple[float, float, float, float, float]] = []
    peaks: list[float] = []  # VmHWM at the end of each round but the last

    class MarkingGrid(InProcessGrid):
        """Marks the start of every round (the strategy asks for the nodes first)."""

        def get_node_ids(self):
            if marks:
                peaks.append(_peak_rss_mb())
            base = _reset_peak_rss_mb()
            marks.append((time.perf_counter(), time.process_time(), client_seconds[0],
                          client_cpu[0], base))
            return super().get_node_ids()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "fed.yaml"
        cfg.write_text(json.dumps({"recipe": {"ssl": {"steps_per_epoch": 1}}, "local_steps": 1,
                                   "min_sites": 1, "evaluate": False, "poll_interval": 0.001,
                                   "max_update_norm": 1e9, "min_cosine": min_cosine,
                                   "exchange": {"down": down, "up": up}}))
        grid = MarkingGrid(app, [SiteSpec(f"s{i}", Path(tmp)) for i in range(sites)],
                           Path(tmp) / "sites")
        run = FederationRun.from_files(cfg, Path(tmp) / "run", 2)
        before_run = _reset_peak_rss_mb()
        run_federation(grid, run, initial=state)
        end = (time.perf_counter(), time.process_time(), client_seconds[0], client_cpu[0])
    if len(marks) != 2:
        raise RuntimeError(f"expected one node query per round, saw {len(marks)}")
    # Time and CPU: the mean of the two rounds, each with its own checkpoint (a round's
    # checkpoint is written while the next one runs, so one round's window holds parts of two).
    t0, c0, cs0, cc0, _ = marks[0]
    base = marks[-1][4]
    state_mb = sum(v.numel() * v.element_size() for v in state.values()) / 2**20
    return {"sites": sites, "preset": preset, "state_mb": state_mb, "exchange": exchange,
            "aggregator_s": ((end[0] - t0) - (end[2] - cs0)) / 2,
            "aggregator_cpu_s": ((end[1] - c0) - (end[3] - cc0)) / 2,
            "peak_mb": _peak_rss_mb() - base, "round1_peak_mb": peaks[0] - before_run}


def _child(kind: str, arg: str, preset: str, exchange: str = "fp32,fp32",
           direction: bool = True) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, arg, "--child-preset", preset,
           "--exchange", exchange] + ([] if direction else ["--no-direction"])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def write_section(path: Path, body: str) -> None:
    replace_section(path, SECTION, f"{SECTION}\n\n{body.strip()}\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["micro", "tiny", "small"])
    p.add_argument("--sites", nargs="+", type=int, default=[2, 8, 32])
    p.add_argument("--aggregate-preset", default="micro",
                   help="model preset of the aggregation sweep (tiny: 4x the state, slower)")
    p.add_argument("--write", type=Path, help="markdown file whose section to update")
    p.add_argument("--exchange", nargs="+", default=["fp32,fp32"],
                   help="DOWN,UP exchanges of the aggregation sweep, e.g. fp32,fp32 bf16,q8_delta")
    p.add_argument("--no-direction", action="store_true",
                   help="also time each row without the direction check (min_cosine: null), "
                   "which needs every reply of a tensor at once from 3 sites on")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--child-preset", default="micro", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, arg = args.child
        result = bytes_one(arg) if kind == "bytes" else aggregate_one(
            int(arg), args.child_preset, args.exchange[0],
            None if args.no_direction else -0.1)
        print(json.dumps(result))
        return 0

    load = os.getloadavg()[0]
    lines = [f"`.venv/bin/python benchmarks/bench_federation.py` on {time.strftime('%Y-%m-%d')}, "
             f"{platform.machine()}, 2 shared CPU cores, torch threads 1, load average "
             f"{load:.1f} at start (other jobs share the cores: CPU seconds are the steadier "
             "number).", "",
             "Bytes per site per round (student + teacher + center in fp32; down = global state "
             "+ config incl. the recipe JSON, up = new state + metrics + site label):", "",
             "| preset | tensors | parameters | down (MB) | up (MB) |", "|---|---|---|---|---|"]
    for preset in args.presets:
        r = _child("bytes", preset, preset)
        lines.append(f"| {preset} | {r['tensors']} | {r['params'] / 1e6:.2f} M | "
                     f"{r['down'] / 1e6:.1f} | {r['up'] / 1e6:.1f} |")
        print(lines[-1], flush=True)
    lines += ["", f"Aggregation per round (two rounds), `{args.aggregate_preset}` "
              "state, mean mode (time = encode + deserialise + decode + validate + park + screen "
              "+ fold + finalise + checkpoint, client time excluded; time and CPU per round, the "
              "mean of the two). "
              "*Round-1 peak* = the process's max RSS in round 1 above its RSS before it, which "
              "holds the initial global state: everything the aggregator adds in a round from a "
              "fresh start, the base of `down: q8_delta` included (it then persists). *Round-2 "
              "peak* = the same for round 2 above the RSS at its start (lower: memory freed in "
              "round 1 stays with the process and is reused). x = / state:", "",
              "| exchange (down,up) | direction check | sites | state (MB) | wall (s) | CPU (s) "
              "| CPU s per site | round-1 peak (MB) | round-1 peak / state | round-2 peak / state |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for exchange in args.exchange:
        for direction in (True, False) if args.no_direction else (True,):
            for n in args.sites:
                r = _child("aggregate", str(n), args.aggregate_preset, exchange, direction)
                check = ("on" if n >= 3 else "on (< 3 sites: skipped)") if direction else "off"
                lines.append(f"| {exchange} | {check} | {n} | {r['state_mb']:.1f} | "
                             f"{r['aggregator_s']:.2f} | {r['aggregator_cpu_s']:.2f} | "
                             f"{r['aggregator_cpu_s'] / n:.3f} | {r['round1_peak_mb']:.0f} | "
                             f"{r['round1_peak_mb'] / r['state_mb']:.2f}x | "
                             f"{r['peak_mb'] / r['state_mb']:.2f}x |")
                print(lines[-1], flush=True)
    lines += ["", "Each reply is decoded, validated and written to the run's `.spill/` folder one "
              "tensor at a time as it arrives (aggregator/spill.py); when the round closes the "
              "round-relative screening reads the parked replies back one tensor at a time and "
              "folds the survivors into one float32 running sum of updates. Memory is the "
              "instruction, the reply being received and one state of sums, whatever the number "
              "of sites; the robust modes (median, trimmed_mean) read the same parked replies "
              "one tensor at a time."]
    body = "\n".join(lines)
    print(body)
    if args.write:
        write_section(args.write, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
