"""Training-step throughput and peak memory of UniMiSSNet on CPU, alone or against the reference.

A *step* is what the student does in a pretraining step, without the optimiser: forward of the
MiT + DINO head on a random batch, the DINO cross-entropy against fixed teacher logits (batch
split into two views, student temperature 0.1, teacher 0.04, zero center), backward. Every
configuration runs in a fresh subprocess that times ``--steps`` steps after ``--warmup`` and
reports its own peak resident memory, so no configuration's allocations inflate another's.

With ``--reference DIR`` (a checkout of YtongXie/UniMiSS-code, loaded from that path at run time
and never copied into this repository) each row runs the reference student, built as its
``main.py`` builds it, and ours side by side: ``--rounds`` alternating pairs of fresh processes,
so load from other jobs on the machine hits both alike. Parameter counts must be identical. The
table gives seconds per step (median over all timed steps), the speed ratio (reference s/step
divided by ours) and the peak-RSS ratio (ours divided by the reference). Unless ``--no-check``,
each row also loads the reference's weights into ours (state-dict names mapped) and compares the
same step: loss, logits and every parameter's gradient, as the largest difference relative to
that tensor's largest magnitude. With ``--write`` the table goes into the "## Model training
step" section of docs/benchmarks.md.

    .venv/bin/python benchmarks/bench_model.py --reference /path/to/UniMiSS-code --write docs/benchmarks.md
    .venv/bin/python benchmarks/bench_model.py --presets micro --steps 2   # ours only, quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from markdown_section import replace_section  # sibling: benchmarks/ is sys.path[0] as a script

SECTION = "## Model training step"
INPUTS = {"2d": (3, 224, 224), "3d": (1, 16, 96, 96)}
HEAD_OUT = 65536  # the reference's --out_dim default; our presets' head_out_dim
REFERENCE_ARCH = {"tiny": "model_tiny", "small": "model_small"}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def dino_loss(student, teacher):
    """DINO cross-entropy of the two views (batch halves), teacher detached, zero center."""
    import torch.nn.functional as F

    s = (student / 0.1).chunk(2)
    t = F.softmax(teacher / 0.04, dim=-1).chunk(2)
    pairs = [(i, j) for i in range(2) for j in range(2) if i != j]
    return sum((-t[i] * F.log_softmax(s[j], dim=-1)).sum(-1).mean() for i, j in pairs) / len(pairs)


def reference_code_dir(root: Path) -> Path:
    """The folder holding the reference's ``main.py`` and ``models/`` (repo root or UniMiSS/)."""
    for cand in (root / "UniMiSS", root):
        if (cand / "models" / "MiT.py").is_file() and (cand / "main.py").is_file():
            return cand
    raise FileNotFoundError(
        f"--reference {root}: no UniMiSS/models/MiT.py and UniMiSS/main.py there; pass a "
        "checkout of YtongXie/UniMiSS-code"
    )


def build_reference(root: Path, preset: str):
    """The reference student (backbone + DINO head), as the reference's ``main.py`` builds it."""
    if preset not in REFERENCE_ARCH:
        raise ValueError(f"the reference has no preset {preset!r}; it has {sorted(REFERENCE_ARCH)}")
    sys.path.insert(0, str(reference_code_dir(root)))
    import models.MiT as ref_mit  # the reference's own modules, from its checkout
    import utils as ref_utils

    backbone = ref_mit.__dict__[REFERENCE_ARCH[preset]](
        norm2D="IN2",
        norm3D="IN3",
        act="LeakyReLU",
        ws=False,
        img_size2D=224,
        img_size3D=[16, 96, 96],
        modal_type="MM",
        drop_path_rate=0.1,
    )
    head = ref_mit.Head(backbone.embed_dim, HEAD_OUT, use_bn=False, norm_last_layer=True)
    return ref_utils.ModuleWrapper(backbone, head)


_KEY_RULES = [  # reference state-dict name -> ours (our names are the exchange contract)
    (r"backbone\.transformer\.patch_embed(\d)D0\.", r"backbone.encoder.stem_\1d."),
    (r"backbone\.transformer\.patch_embed(\d)D(\d)\.proj\.", r"backbone.encoder.patch_embed_\1d.<\2-1>."),
    (r"backbone\.transformer\.pos_embed(\d)D(\d)$", r"backbone.encoder.pos_embed_\1d.<\2-1>.weight"),
    (r"backbone\.transformer\.cls_tokens1$", r"backbone.encoder.cls_token.weight"),
    (r"backbone\.transformer\.cls_tokens(\d)\.", r"backbone.encoder.cls_proj.<\1-2>."),
    (r"backbone\.transformer\.block(\d)\.", r"backbone.encoder.stages.<\1-1>."),
    (r"backbone\.DecPosEmbed(\d)D(\d)$", r"backbone.decoder.pos_embed_\1d.\2.weight"),
    (r"backbone\.DecEmbed(\d)D(\d)\.proj\.", r"backbone.decoder.up_\1d.\2."),
    (r"backbone\.Decblock(\d)\.", r"backbone.decoder.stages.\1."),
    (r"backbone\.cls_tokens(\d)\.", r"backbone.decoder.cls_proj.\1."),
    (r"backbone\.norm\.", r"backbone.decoder.norm."),
    (r"\.sr(\d)D\.", r".sr_\1d."),
]


def our_name(ref_name: str) -> str:
    """Our state-dict name of a reference tensor (the head's names are the same)."""
    import re

    name = ref_name
    for pattern, repl in _KEY_RULES:
        name = re.sub(pattern, repl, name)
    return re.sub(r"<(\d+)-(\d+)>", lambda m: str(int(m[1]) - int(m[2])), name)


def check_equivalence(ref: Path, preset: str, kind: str, batch: int, threads: int) -> dict:
    """Ours with the reference's weights: the same step's loss, logits and every gradient.

    Returns the largest difference of each relative to that tensor's largest magnitude.
    """
    import contextlib
    import io

    import torch

    from fed_unimiss.models import create_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):
        reference = build_reference(ref, preset)
    ours = create_model(preset)
    ref_state = reference.state_dict()
    mapped = {our_name(k): v for k, v in ref_state.items()}
    if set(mapped) != set(ours.state_dict()):
        raise SystemExit(f"{preset}: reference names do not map one to one onto ours")
    ours.load_state_dict(mapped)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *INPUTS[kind], generator=gen)
    teacher = torch.randn(batch, HEAD_OUT, generator=gen)
    results = {}
    for name, model in (("ref", reference), ("ours", ours)):
        model.zero_grad(set_to_none=True)
        logits = model(x)
        loss = dino_loss(logits, teacher)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        if name == "ref":
            grads = {our_name(n): g for n, g in grads.items()}
        results[name] = (loss.detach(), logits.detach(), grads)

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

    (l_r, z_r, g_r), (l_o, z_o, g_o) = results["ref"], results["ours"]
    if set(g_r) != set(g_o):
        raise SystemExit(f"{preset} {kind}: different tensors got gradients")
    worst = max(g_r, key=lambda n: rel(g_o[n], g_r[n]))
    return {
        "loss": rel(l_o, l_r),
        "logits": rel(z_o, z_r),
        "grad_worst": rel(g_o[worst], g_r[worst]),
        "grad_worst_name": worst,
        "grads": len(g_r),
    }


def run_one(
    impl: str, preset: str, kind: str, batch: int, steps: int, warmup: int, threads: int, ref: str
) -> dict:
    """One configuration, in this process (called in a child by :func:`main`)."""
    import contextlib
    import io

    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    if impl == "ref":
        with contextlib.redirect_stdout(io.StringIO()):  # the reference prints its sizes
            model = build_reference(Path(ref), preset)
    else:
        from fed_unimiss.models import create_model

        model = create_model(preset)
    model.train()
    # ours-bf16: our model under bf16 autocast (fp32 weights), the loss in fp32 as the engine does
    precision = torch.bfloat16 if impl == "ours-bf16" else None
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *INPUTS[kind], generator=gen)
    teacher = torch.randn(batch, HEAD_OUT, generator=gen)
    rss_model = _rss_mb()
    times = []
    for i in range(warmup + steps):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=precision or torch.float32, enabled=bool(precision)):
            out = model(x)
        dino_loss(out.float(), teacher).backward()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {
        "impl": impl,
        "preset": preset,
        "kind": kind,
        "params": sum(p.numel() for p in model.parameters()),
        "times": times,
        "rss_model_mb": rss_model,
        "peak_rss_mb": _rss_mb(),
    }


def _child(args: argparse.Namespace, impl: str, preset: str, kind: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        f"{impl}:{preset}:{kind}",
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
    ]
    if args.reference:
        cmd += ["--reference", str(args.reference)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _input_label(kind: str) -> str:
    shape = INPUTS[kind]
    return f"{kind.upper()} {shape[0]}x" + "x".join(map(str, shape[1:]))


def measure(args: argparse.Namespace, preset: str, kind: str) -> dict:
    """All rounds of one row; reference and ours alternate (which goes first alternates too)."""
    impls = ["ref", "ours"] if args.reference else ["ours"]
    if args.bf16:
        impls.append("ours-bf16")
    runs: dict[str, list[dict]] = {i: [] for i in impls}
    for r in range(args.rounds):
        for impl in impls if r % 2 == 0 else list(reversed(impls)):
            runs[impl].append(_child(args, impl, preset, kind))
    row = {"preset": preset, "input": _input_label(kind)}
    if args.reference and args.check:
        row["check"] = _child(args, "check", preset, kind)
    for impl, rs in runs.items():
        times = [t for run in rs for t in run["times"]]
        row[impl] = {
            "params": rs[0]["params"],
            "median_s": statistics.median(times),
            "mean_s": statistics.fmean(times),
            "best_s": min(times),
            "rss_model_mb": max(run["rss_model_mb"] for run in rs),
            "peak_rss_mb": max(run["peak_rss_mb"] for run in rs),
        }
    if args.reference and row["ref"]["params"] != row["ours"]["params"]:
        raise SystemExit(
            f"{preset}: parameter counts differ, reference {row['ref']['params']:,} vs ours "
            f"{row['ours']['params']:,}; the comparison would not be like for like"
        )
    return row


def _table(rows: list[dict], batch: int) -> str:
    if "ref" in rows[0]:
        lines = [
            "| preset | input | params (M) | reference s/step | ours s/step | speed vs reference "
            "| same, from the best steps | reference peak RSS (MB) | ours peak RSS (MB) "
            "| RSS vs reference | same weights: logits / worst gradient, max rel. diff |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        bf16 = "ours-bf16" in rows[0]
        if bf16:
            lines[0] += " ours bf16 s/step | bf16 speed vs reference | bf16 RSS vs reference |"
            lines[1] += "---|---|---|"
        for r in rows:
            ref, ours = r["ref"], r["ours"]
            chk = r.get("check")
            same = f"{chk['logits']:.1e} / {chk['grad_worst']:.1e}" if chk else "not checked"
            extra = ""
            if bf16:
                b = r["ours-bf16"]
                extra = (f" {b['median_s']:.3f} | **{ref['median_s'] / b['median_s']:.2f}x** | "
                         f"{b['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x |")
            lines.append(
                f"| {r['preset']} | {r['input']} | {ours['params'] / 1e6:.2f} | "
                f"{ref['median_s']:.3f} | {ours['median_s']:.3f} | "
                f"**{ref['median_s'] / ours['median_s']:.2f}x** | "
                f"{ref['best_s'] / ours['best_s']:.2f}x ({ref['best_s']:.3f} / {ours['best_s']:.3f}) | "
                f"{ref['peak_rss_mb']:.0f} | "
                f"{ours['peak_rss_mb']:.0f} | {ours['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x | "
                f"{same} |{extra}"
            )
        return "\n".join(lines)
    lines = [
        "| preset | input | params (M) | s/step (median) | s/step (best) | samples/s | "
        "RSS after build (MB) | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o = r["ours"]
        lines.append(
            f"| {r['preset']} | {r['input']} | {o['params'] / 1e6:.2f} | {o['median_s']:.3f} | "
            f"{o['best_s']:.3f} | {batch / o['median_s']:.2f} | {o['rss_model_mb']:.0f} | "
            f"{o['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def write_section(path: Path, body: str) -> None:
    replace_section(path, SECTION, f"{SECTION}\n\n{body.strip()}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--inputs", nargs="+", choices=sorted(INPUTS), default=["2d", "3d"])
    parser.add_argument("--batch", type=int, default=2, help="even: the loss splits two views")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per process first")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="fresh processes per implementation and row; more rounds average out other load",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="torch threads (the issue-14 table uses 2)",
    )
    parser.add_argument(
        "--reference",
        type=Path,
        help="checkout of YtongXie/UniMiSS-code: measure its student side by side with ours",
    )
    parser.add_argument(
        "--no-check",
        dest="check",
        action="store_false",
        help="skip the equivalence check (ours loaded with the reference's weights, same step: "
        "loss, logits and every gradient compared); it runs by default with --reference",
    )
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="also measure ours under bf16 autocast (fp32 weights; a path that changes numerics, "
        "so its training equivalence is shown separately: benchmarks/bench_precision.py)",
    )
    parser.add_argument("--write", type=Path, help="markdown file whose section to update")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch % 2:
        parser.error("--batch must be even (the DINO loss compares two views)")

    if args.child:  # one configuration, result as JSON on stdout
        impl, preset, kind = args.child.split(":")
        if impl == "check":
            print(json.dumps(check_equivalence(args.reference, preset, kind, args.batch, args.threads)))
            return 0
        result = run_one(
            impl, preset, kind, args.batch, args.steps, args.warmup, args.threads, args.reference
        )
        print(json.dumps(result))
        return 0

    if args.reference:
        reference_code_dir(args.reference)  # fail before any run
    load_start = os.getloadavg()
    rows = []
    for preset in args.presets:
        for kind in args.inputs:
            rows.append(measure(args, preset, kind))
            print(_table(rows[-1:], args.batch).splitlines()[-1], flush=True)
    load_end = os.getloadavg()
    import torch

    cmd = (
        f"`.venv/bin/python benchmarks/bench_model.py --presets {' '.join(args.presets)} "
        f"--inputs {' '.join(args.inputs)} --batch {args.batch} --steps {args.steps} "
        f"--warmup {args.warmup} --rounds {args.rounds} --threads {args.threads}"
        + (" --reference UniMiSS-code" if args.reference else "")
        + ("" if args.check or not args.reference else " --no-check")
        + (" --bf16" if args.bf16 else "")
        + "`"
    )
    what = (
        "Each row: "
        + (
            f"{args.rounds} rounds of alternating fresh processes, reference and ours, "
            if args.reference
            else f"{args.rounds} fresh processes, "
        )
        + f"each {args.warmup} warm-up + {args.steps} timed steps; s/step is the median over "
        "all timed steps; the best-step ratio compares each side's fastest step, the one least "
        "disturbed by other jobs. A step = student forward (MiT + DINO head, 65,536 outputs) on a "
        f"random batch of {args.batch}, DINO cross-entropy against fixed teacher logits, backward; "
        "no optimiser. Peak RSS is the whole process (Python + torch + model + activations), the "
        "maximum over its rounds."
    )
    body = "\n".join(
        [
            f"Command: {cmd}",
            "",
            f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
            f"(torch threads {args.threads}), torch {torch.__version__}, fp32, CPU only; "
            f"1-min load average {load_start[0]:.1f} at the start and {load_end[0]:.1f} at "
            "the end (the cores are shared with other jobs: the ratio is the number to read). "
            + what,
            "",
            _table(rows, args.batch),
        ]
    )
    print("\n" + body)
    if args.write:
        write_section(args.write, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
