"""Per-round X25519 key pairs, signed with the site's identity key and checked against a roster.

As in Bonawitz et al. (CCS 2017), every site draws two fresh X25519 key pairs per round: the
*mask* pair, whose agreement with each peer seeds their pairwise mask, and the *share* pair,
whose agreement keys the encryption of the Shamir shares sent to that peer through the
aggregator. Fresh pairs per round mean a secret key reconstructed after a dropout exposes that
round only.

Both public keys are signed with the site's identity key (ECDSA P-384 with SHA-384, the key
the provisioning command makes for each site, in OpenSSH format), over the round id, the
site's name, both keys and a SHA-256 commitment to the site's self-mask seed
(:func:`advert_message`). The commitment hides nothing a seed of 256 random bits would not
(it reveals nothing about it), and it lets the aggregator check a seed rebuilt from shares, as
it checks a rebuilt mask key against its public key: a survivor that reveals a bad share is
caught instead of silently spoiling the sum. Every site checks every other site's
signature against its **roster** of identity public keys before it masks or shares anything, so
an aggregator that swaps in keys of its own (to read shares, or to play all other sites) is
refused with a :class:`~fed_unimiss.secure_aggregation.errors.KeyVerificationError` naming the
site.

**Where the roster comes from, and what it trusts.** The roster is a folder of ``<site>.pub``
files (OpenSSH public keys), the same format as the coordinator kit's ``site-keys/``, to be
shipped in every site kit at provisioning (:func:`load_roster`). Its trust is the trust of
provisioning: whoever ran ``provision`` (the consortium authority, with the CA key offline) is
trusted *at provisioning time* to hand every site the true roster and to keep no copy of any
site's private key; the running aggregator (SuperLink, ServerApp) is *not* trusted with updates.
Sites can compare :func:`roster_digest` out of band (e.g. read it out at the consortium's
kick-off call). Where the authority must not be trusted with private keys at all, a site makes
its own identity key and sends only the public half to be put in the roster.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from fed_unimiss.secure_aggregation.errors import KeyVerificationError
from fed_unimiss.secure_aggregation.framing import frame

__all__ = ["EphemeralKeys", "advert_message", "sign_advert", "verify_advert", "load_roster",
           "load_identity_key", "roster_digest", "x25519_agree", "x25519_public",
           "seed_commitment", "ADVERT_FIELDS"]

_CONTEXT = b"fed-unimiss/secure-aggregation/v1/advertise"
_CURVE = ec.SECP384R1
_COMMIT_CONTEXT = b"fed-unimiss/secure-aggregation/v1/self-mask-seed"
ADVERT_FIELDS = ("mask_pk", "share_pk", "seed_commitment", "signature")


def _raw_public(key: x25519.X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class EphemeralKeys:
    """A site's secrets for one round: two X25519 key pairs and its self-mask seed."""

    mask: x25519.X25519PrivateKey  # agreement with each peer: the pairwise mask seeds
    share: x25519.X25519PrivateKey  # agreement with each peer: the keys sealing shares
    self_seed: bytes  # b_u, 32 bytes from the OS's CSPRNG: the self mask

    @classmethod
    def generate(cls) -> EphemeralKeys:
        return cls(mask=x25519.X25519PrivateKey.generate(),
                   share=x25519.X25519PrivateKey.generate(),
                   self_seed=secrets.token_bytes(32))

    def mask_public(self) -> bytes:
        return _raw_public(self.mask.public_key())

    def share_public(self) -> bytes:
        return _raw_public(self.share.public_key())

    def mask_secret(self) -> bytes:
        """The mask key's 32 raw bytes: what is Shamir-shared for dropout recovery."""
        return self.mask.private_bytes(serialization.Encoding.Raw,
                                       serialization.PrivateFormat.Raw,
                                       serialization.NoEncryption())


def x25519_public(secret: bytes) -> bytes:
    """The raw public key of a raw X25519 secret key (to check a reconstructed key)."""
    return _raw_public(x25519.X25519PrivateKey.from_private_bytes(secret).public_key())


def x25519_agree(secret: x25519.X25519PrivateKey | bytes, peer_public: bytes) -> bytes:
    """The X25519 shared secret; ``ValueError`` for a malformed or low-order peer key."""
    if isinstance(secret, bytes):
        secret = x25519.X25519PrivateKey.from_private_bytes(secret)
    peer = x25519.X25519PublicKey.from_public_bytes(peer_public)
    shared = secret.exchange(peer)  # cryptography refuses an all-zero result
    return shared


def seed_commitment(seed: bytes, round_id: str, site: str) -> bytes:
    """SHA-256 of a self-mask seed, bound to the round and the site (32 bytes)."""
    return hashlib.sha256(frame(_COMMIT_CONTEXT, round_id, site, seed)).digest()


def advert_message(round_id: str, site: str, mask_pk: bytes, share_pk: bytes,
                   commitment: bytes) -> bytes:
    """The bytes a site signs: context, round, its name, both keys and its seed commitment."""
    return frame(_CONTEXT, round_id, site, mask_pk, share_pk, commitment)


def sign_advert(identity: ec.EllipticCurvePrivateKey, round_id: str, site: str,
                keys: EphemeralKeys) -> dict[str, bytes]:
    """``{"mask_pk", "share_pk", "seed_commitment", "signature"}``: a site's first message."""
    if not isinstance(identity.curve, _CURVE):
        raise ValueError(f"site {site!r}: identity key is on {identity.curve.name}, expected "
                         f"{_CURVE.name}")
    mask_pk, share_pk = keys.mask_public(), keys.share_public()
    commitment = seed_commitment(keys.self_seed, round_id, site)
    signature = identity.sign(advert_message(round_id, site, mask_pk, share_pk, commitment),
                              ec.ECDSA(hashes.SHA384()))
    return {"mask_pk": mask_pk, "share_pk": share_pk, "seed_commitment": commitment,
            "signature": signature}


def verify_advert(roster: Mapping[str, ec.EllipticCurvePublicKey], round_id: str, site: str,
                  advert: Mapping[str, bytes]) -> None:
    """Raise ``KeyVerificationError`` naming ``site`` unless its identity key signed ``advert``."""
    key = roster.get(site)
    if key is None:
        raise KeyVerificationError(site, "the site is not in this site's roster")
    try:
        mask_pk, share_pk, commitment, signature = (bytes(advert[f]) for f in ADVERT_FIELDS)
    except (KeyError, TypeError) as e:
        raise KeyVerificationError(site, f"malformed advertisement ({e})") from None
    if len(mask_pk) != 32 or len(share_pk) != 32 or len(commitment) != 32:
        raise KeyVerificationError(site, "a public key or the commitment is not 32 bytes")
    if mask_pk == share_pk:
        raise KeyVerificationError(site, "the mask and share keys are the same")
    try:
        key.verify(signature, advert_message(round_id, site, mask_pk, share_pk, commitment),
                   ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise KeyVerificationError(site, "the signature does not verify") from None


def load_identity_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    """A site's identity key from its kit (``site.key``, OpenSSH private key, P-384)."""
    key = serialization.load_ssh_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, _CURVE):
        raise ValueError(f"{path}: not an EC {_CURVE.name} key (provision makes those)")
    return key


def load_roster(folder: str | Path) -> dict[str, ec.EllipticCurvePublicKey]:
    """``{site: identity public key}`` from the ``<site>.pub`` files of ``folder``.

    Raises ``ValueError`` naming the file for a key that is not EC P-384.
    """
    roster = {}
    for path in sorted(Path(folder).glob("*.pub")):
        key = serialization.load_ssh_public_key(path.read_bytes().split(b"\n")[0].strip())
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, _CURVE):
            raise ValueError(f"{path}: not an EC {_CURVE.name} public key")
        roster[path.stem] = key
    if not roster:
        raise ValueError(f"{folder}: no <site>.pub files; the roster is empty")
    return roster


def roster_digest(roster: Mapping[str, ec.EllipticCurvePublicKey]) -> str:
    """SHA-256 over the sorted site names and their keys: to compare rosters out of band."""
    h = hashlib.sha256()
    for site in sorted(roster):
        der = roster[site].public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
        h.update(frame(site, der))
    return h.hexdigest()
