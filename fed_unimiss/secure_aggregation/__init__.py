"""Secure aggregation: the aggregator sums site updates it cannot read.

The protocol of Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", ACM CCS 2017 (https://doi.org/10.1145/3133956.3133982), in four stages: advertise
keys, share keys, masked input, unmasking. Each site adds pairwise masks that cancel in the sum
and a self mask the aggregator removes only for sites whose vectors it counted; Shamir shares of
both secrets let t survivors finish a round that lost sites.

Modules, each one thing (pure Python/numpy/torch, no flwr; every message is plain data):

- :mod:`.ring`: a float update -> integers mod 2^k (announced scales, clip, stochastic
  rounding, error feedback, weights, the overflow bound) and the sum back to a mean;
- :mod:`.keys`: per-round X25519 key pairs signed with the site's P-384 identity key; the roster;
- :mod:`.masks` / :mod:`.prg`: mask seeds (X25519 + HKDF-SHA256) and their ChaCha20 expansion;
- :mod:`.shares`: Shamir shares (pycryptodome) of the two secrets, sealed with ChaCha20-Poly1305;
- :mod:`.plan`: the round plan the aggregator announces;
- :mod:`.site` / :mod:`.server`: :class:`SiteParty` and :class:`AggregatorParty`, one call per
  stage;
- :mod:`.errors`: :class:`TooFewSurvivors` (retry the round) and the refusals.

Threat model: the aggregator is honest-but-curious about updates (it follows the protocol but
reads all it holds), or actively tries to swap keys (refused by the signatures) or to collect
both shares of one site (refused by every honest site). A survivor that reveals a bad share is
caught: every rebuilt secret is checked against what its owner signed (its mask public key, a
commitment to its self-mask seed), and with spare shares one bad share is outvoted. Not covered here: the signed
consistency round of the active-adversary variant, which stops an aggregator that tells
different sites different survivor lists; a strict-majority threshold (:mod:`.plan`) narrows
that attack but does not close it. Colluding sites fewer than t learn nothing of another site's
update beyond what the sum reveals.

Cost: every site masks against every other (the complete graph of the original protocol), so
a site's masking grows linearly with the number of sites; SecAgg+ (Bell et al., CCS 2020)
masks against O(log n) neighbours instead and is the next step for large federations.
"""

from fed_unimiss.secure_aggregation.errors import (
    KeyVerificationError,
    ProtocolError,
    RevealRefused,
    SecureAggregationError,
    TooFewSurvivors,
)
from fed_unimiss.secure_aggregation.plan import RoundPlan, min_threshold
from fed_unimiss.secure_aggregation.ring import RingPlan
from fed_unimiss.secure_aggregation.server import AggregateResult, AggregatorParty
from fed_unimiss.secure_aggregation.site import SiteParty

__all__ = ["AggregateResult", "AggregatorParty", "KeyVerificationError", "ProtocolError",
           "RevealRefused", "RingPlan", "RoundPlan", "SecureAggregationError", "SiteParty",
           "TooFewSurvivors", "min_threshold"]
