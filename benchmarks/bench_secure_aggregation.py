"""Secure aggregation's cost: CPU seconds of masking and unmasking, and bytes per site per round.

For the exchanged state (student + teacher + center) of each preset and each number of sites,
one secure round of :mod:`fed_unimiss.secure_aggregation` with real keys, shares and masks:

- site: quantise + weight one update (``quantise``, ``to_ring``; the plain int8 exchange
  quantises too), mask it (``masked_input``: open the inbox, the self mask and one pairwise
  mask per peer), and its key stages (``advertise``, ``share_keys``, ``unmask``);
- aggregator: adding every masked vector to the running sum and removing the masks
  (``receive_masked`` x N + ``finish``), with no dropout and with one site dropped before upload
  (its pairwise masks are rebuilt from its key and removed, one per survivor);
- bytes per site per round, up: the masked vector (ceil(k/8) bytes per coordinate) plus the
  protocol's messages, against the fp32 state and today's int8 exchange (``up: q8_delta``:
  one int8 per value in blocks of 256 per tensor, plus one float32 scale per block).

Only one site's masking is timed (every site does the same work, in parallel at its own
hospital); the other sites' masked vectors are one stand-in of the right size and dtype (a
uniform ring vector), so the aggregator's arithmetic is the real one but its sum is not checked
here (tests/secure_aggregation checks exact sums). Every key, share and mask is real. CPU
seconds of this process (``time.process_time``), single-threaded torch; each CPU column is the
median of ``--repeat`` rounds.

    .venv/bin/python benchmarks/bench_secure_aggregation.py
    .venv/bin/python benchmarks/bench_secure_aggregation.py --presets micro --sites 3 8

``--neighbours K ...`` adds, for every number of sites above K + 1, a round on a neighbour graph
(SecAgg+, ``exchange.secure.neighbours``): each site masks with K sites, not all the others.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BITS = 16  # 2 bytes a coordinate: 0.5x the fp32 bytes
LEVELS = 31  # the shipped default: 63 steps per coordinate; error feedback keeps the rest


def _layout(preset: str) -> tuple[tuple[int, str], ...]:
    """(size, part) of every exchanged tensor of ``preset``, in the packing order."""
    from fed_unimiss.exchange import classify_exchange_keys
    from fed_unimiss.models import create_model, get_config

    net = create_model(preset)
    shapes = {f"{p}.{k}": tuple(v.shape) for k, v in net.state_dict().items()
              for p in ("student", "teacher")}
    shapes["center"] = (1, get_config(preset).head_out_dim)
    classes = classify_exchange_keys(shapes)
    return tuple((math.prod(shapes[n]), classes[n]) for n in sorted(shapes))


def _int8_bytes(layout) -> int:
    from fed_unimiss.exchange_codec import BLOCK

    blocks = sum(max(1, math.ceil(size / BLOCK)) for size, _ in layout)
    return blocks * BLOCK + 4 * blocks


def _cpu(fn):
    t0 = time.process_time()
    out = fn()
    return out, time.process_time() - t0


def _round(layout, n_sites: int, drop_before: bool, time_site: bool,
           degree: int | None = None) -> dict:
    import torch
    from cryptography.hazmat.primitives.asymmetric import ec

    from fed_unimiss.secure_aggregation import AggregatorParty, RoundPlan, SiteParty
    from fed_unimiss.secure_aggregation.masks import expand, new_seed
    from fed_unimiss.secure_aggregation.plan import harary_order, min_threshold
    from fed_unimiss.secure_aggregation.ring import part_weights, plan_ring, quantise, to_ring

    size = sum(s for s, _ in layout)
    ring = plan_ring(layout, n_sites, max_count=10_000, clip=0.01, bits=BITS, levels=LEVELS)
    sites = tuple(f"site-{i:02d}" for i in range(n_sites))
    plan = RoundPlan(round_id="bench/1", sites=sites, threshold=min_threshold(n_sites, degree),
                     ring=ring, degree=degree, order=harary_order(sites) if degree else ())
    ids = {s: ec.generate_private_key(ec.SECP384R1()) for s in sites}
    roster = {s: k.public_key() for s, k in ids.items()}
    parties = {s: SiteParty(plan, s, ids[s], roster) for s in sites}
    agg = AggregatorParty(plan)
    me = sites[0]  # the site whose CPU time and bytes are reported
    up, keys_cpu = 0, 0.0
    for s, p in parties.items():
        advert, t = _cpu(p.advertise)
        if s == me:
            keys_cpu += t
            up += sum(len(v) for v in advert.values())
        agg.receive_advert(s, advert)
    adverts = agg.adverts()
    for s, p in parties.items():
        sealed, t = _cpu(lambda p=p: p.share_keys(adverts))
        if s == me:
            keys_cpu += t
            up += sum(len(v) for v in sealed.values())
        agg.receive_shares(s, sealed)
    inboxes = agg.inboxes()
    down = (sum(len(v) for a in adverts.values() for v in a.values())
            + sum(len(v) for v in inboxes[me].values()))

    standin = expand(new_seed(), ring)  # the others' masked vectors: same size, not timed
    vectors, site_cpu, quantise_cpu = {}, float("nan"), float("nan")
    weights = part_weights(3000, 1000, ring)  # a CT site: slices and volumes
    if time_site:
        update = torch.randn(size) * 0.003

        ring_vec, quantise_cpu = _cpu(lambda: to_ring(
            quantise(update, ring, seed=new_seed()).values, ring, weights))
        vectors[me], site_cpu = _cpu(lambda: parties[me].masked_input(inboxes[me], ring_vec))
    up += BITS // 8 * size + 3 * 8  # the masked vector and its three part weights
    dropped = sorted(plan.neighbours(me))[0] if drop_before else None  # one of me's peers
    agg_cpu = 0.0
    for s in sites:
        if s == dropped:
            continue
        vec = vectors.pop(s, None)
        if vec is None:  # a stand-in; the site still opens its inbox (it answers unmasking)
            parties[s].open_inbox(inboxes[s])
            vec = standin
        _, t = _cpu(lambda s=s, vec=vec: agg.receive_masked(s, vec, weights))
        agg_cpu += t
        del vec
    survivors = agg.survivors()
    for s in survivors:
        reveal, t = _cpu(lambda s=s: parties[s].unmask(survivors))
        if s == me:
            keys_cpu += t
            up += sum(len(v) for kind in reveal.values() for v in kind.values())
        agg.receive_unmask(s, reveal)
    _, t = _cpu(agg.finish)
    agg_cpu += t
    return {"site_cpu": site_cpu, "quantise_cpu": quantise_cpu, "keys_cpu": keys_cpu, "agg_cpu": agg_cpu, "up": up,
            "down_extra": down, "masked_bytes": BITS // 8 * size}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["micro", "tiny"],
                        help="model presets whose exchanged state is masked")
    parser.add_argument("--sites", nargs="+", type=int, default=[3, 8, 32],
                        help="numbers of sites per round")
    parser.add_argument("--neighbours", nargs="*", type=int, default=[8, 16],
                        help="neighbour-graph degrees to run as well (SecAgg+)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds per row; each CPU column is their median (first touches "
                             "of fresh memory make single rounds noisy)")
    args = parser.parse_args(argv)

    import torch

    from fed_unimiss.secure_aggregation.ring import plan_ring, quantise

    torch.set_num_threads(1)
    warm = plan_ring(((4096, "shared"),), 3, max_count=10, clip=0.01, bits=BITS, levels=LEVELS)
    quantise(torch.zeros(4096), warm, seed=bytes(32))  # the process's first-call costs
    print(f"# secure aggregation, ring 2^{BITS}, {LEVELS} levels, threshold a strict majority; "
          f"{platform.processor() or platform.machine()}, torch threads 1\n")
    print("| state | coordinates | sites | neighbours | site: quantise + weight (CPU s) "
          "| site: mask (CPU s) "
          "| site: keys, shares, unmask (CPU s) | aggregator: sum + unmask (CPU s) | same, 1 "
          "site dropped before upload (CPU s) | up bytes/site: secure | fp32 | int8 exchange "
          "| secure / fp32 |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for preset in args.presets:
        layout = _layout(preset)
        size = sum(s for s, _ in layout)
        runs = [(n, None) for n in args.sites] + [(n, k) for n in args.sites
                                                  for k in args.neighbours if k < n - 1]
        for n, k in runs:
            fulls = [_round(layout, n, drop_before=False, time_site=True, degree=k)
                     for _ in range(args.repeat)]
            full = {key: statistics.median(f[key] for f in fulls) for key in fulls[0]}
            drop = {"agg_cpu": statistics.median(
                _round(layout, n, drop_before=True, time_site=False, degree=k)["agg_cpu"]
                for _ in range(args.repeat))}
            fp32 = 4 * size
            print(f"| {preset} | {size:,} | {n} | {k or 'all'} | {full['quantise_cpu']:.2f} | "
                  f"{full['site_cpu']:.2f} | "
                  f"{full['keys_cpu']:.3f} | {full['agg_cpu']:.2f} | {drop['agg_cpu']:.2f} | "
                  f"{full['up']:,} | {fp32:,} | {_int8_bytes(layout):,} | "
                  f"{full['up'] / fp32:.3f} |", flush=True)
            print(f"<!-- {preset} {n} sites, neighbours {k or 'all'}: protocol messages besides the masked vector: "
                  f"{full['up'] - full['masked_bytes']:,} B up, {full['down_extra']:,} B down "
                  f"-->", flush=True)


if __name__ == "__main__":
    main()
