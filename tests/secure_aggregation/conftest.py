"""Fixtures of the secure-aggregation tests: real P-384 identities and their roster."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from secagg_helpers import SITES


@pytest.fixture(scope="session")
def identities() -> dict[str, ec.EllipticCurvePrivateKey]:
    return {s: ec.generate_private_key(ec.SECP384R1()) for s in SITES}


@pytest.fixture(scope="session")
def roster(identities) -> dict[str, ec.EllipticCurvePublicKey]:
    return {s: k.public_key() for s, k in identities.items()}
