"""Provisioning: certificates, keys, permissions, refusal to overwrite, kits the commands accept."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from aggregator.deploy.control import load_site_public_key
from aggregator.deploy.superlink import load_coordinator_kit
from aggregator.provision import ProvisionError, provision
from fed_unimiss.config import ConfigError
from site_client.supernode import EXIT_BAD_INPUT, SiteError, load_site_kit


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    return provision(["A", "B"], tmp_path_factory.mktemp("kits") / "KITS",
                     server_names=["coord.example.org", "10.1.2.3"])


def _mode(p):
    return stat.S_IMODE(p.stat().st_mode)


def test_server_certificate_has_every_san_and_chains_to_the_ca(kits):
    cert = x509.load_pem_x509_certificate((kits.coordinator / "server.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((kits.coordinator / "ca.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"coord.example.org", "localhost"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.1.2.3")}
    cert.verify_directly_issued_by(ca)  # raises if not signed by the consortium CA
    # every site kit carries the same CA certificate
    for site_dir in kits.sites.values():
        assert (site_dir / "ca.crt").read_bytes() == (kits.coordinator / "ca.crt").read_bytes()


def test_private_keys_are_0600_and_kit_folders_0700(kits):
    assert _mode(kits.coordinator / "server.key") == 0o600
    assert _mode(kits.authority / "ca.key") == 0o600
    for folder in (kits.authority, kits.coordinator, *kits.sites.values()):
        assert _mode(folder) == 0o700
    for site_dir in kits.sites.values():
        assert _mode(site_dir / "site.key") == 0o600
    # the coordinator kit holds no site private key, and sites hold no CA or server key
    assert not list(kits.coordinator.rglob("site.key"))
    assert not list(kits.sites["A"].glob("*ca.key")) and not (kits.sites["A"] / "server.key").exists()


def test_site_keys_are_nist_ec_and_registered_copy_matches(kits):
    for site, site_dir in kits.sites.items():
        key = serialization.load_ssh_private_key((site_dir / "site.key").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        assert (load_site_public_key(kits.coordinator / "site-keys" / f"{site}.pub")
                == load_site_public_key(site_dir / "site.pub"))
    assert load_site_public_key(kits.sites["A"] / "site.pub") != \
        load_site_public_key(kits.sites["B"] / "site.pub")


def test_kits_load_with_the_commands_readers(kits):
    coord = load_coordinator_kit(kits.coordinator)
    assert set(coord.site_keys) == {"A", "B"}
    assert coord.settings.fleet_address == "0.0.0.0:9092"
    site = load_site_kit(kits.sites["B"])
    assert site.settings.site_name == "B"
    assert site.settings.superlink == "coord.example.org:9092"


def test_coordinator_kit_has_a_loadable_federation_template(kits):
    from fed_unimiss.federation import load_federation, resolve_recipe

    path = kits.coordinator / "federation.yaml"
    cfg = load_federation(path)
    assert isinstance(cfg.recipe, str) and Path(cfg.recipe).is_absolute()
    resolve_recipe(cfg, path)  # the recipe it names exists and loads


def test_rerun_refuses_to_overwrite_and_names_the_folder(kits):
    before = (kits.sites["A"] / "site.key").read_bytes()
    with pytest.raises(ProvisionError, match="refusing to overwrite.*site-A"):
        provision(["A", "C"], kits.root)
    assert (kits.sites["A"] / "site.key").read_bytes() == before
    assert not (kits.root / "site-C").exists()  # nothing half-written


@pytest.mark.parametrize("sites, match", [
    ([], "at least one site"),
    (["A", "A"], "duplicate site name"),
    (["bad/name"], "not allowed"),
    (["-x"], "not allowed"),
])
def test_bad_site_lists_are_refused(tmp_path, sites, match):
    with pytest.raises(ProvisionError, match=match):
        provision(sites, tmp_path / "k")


def test_site_kit_with_a_foreign_key_is_refused(tmp_path):
    a = provision(["A"], tmp_path / "one")
    b = provision(["A"], tmp_path / "two")
    (a.sites["A"] / "site.key").write_bytes((b.sites["A"] / "site.key").read_bytes())
    with pytest.raises(SiteError, match="does not match") as err:
        load_site_kit(a.sites["A"])
    assert err.value.code == EXIT_BAD_INPUT


def test_site_kit_with_garbage_ca_is_refused(tmp_path):
    k = provision(["A"], tmp_path / "k")
    (k.sites["A"] / "ca.crt").write_text("not a certificate")
    with pytest.raises(SiteError, match="ca.crt: not a PEM certificate"):
        load_site_kit(k.sites["A"])


def test_coordinator_kit_missing_key_file_is_named(tmp_path):
    k = provision(["A", "B"], tmp_path / "k")
    (k.coordinator / "site-keys" / "B.pub").unlink()
    with pytest.raises(ConfigError, match=r"sites\.B: key file .*B\.pub does not exist"):
        load_coordinator_kit(k.coordinator)


def test_provision_cli_exit_codes(tmp_path, capsys):
    from fed_unimiss.cli.main import main

    assert main(["provision", "--sites", "A,B", "--out", str(tmp_path / "K"),
                 "--server-name", "h1,h2"]) == 0
    assert "site A kit" in capsys.readouterr().out
    assert main(["provision", "--sites", "A", "--out", str(tmp_path / "K")]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err


def test_add_sites_later_extends_the_coordinator_kit(tmp_path):
    """`provision --add-sites D`: a new site kit with the same CA, its key listed for the
    coordinator; a name already taken is refused."""
    from aggregator.deploy.superlink import load_coordinator_kit
    from aggregator.provision import ProvisionError, add_sites, provision

    kits = provision(["A", "B"], tmp_path / "K", server_names=["fl.example.org"])
    added = add_sites(["D"], tmp_path / "K")
    kit = load_coordinator_kit(kits.coordinator)
    assert set(kit.site_keys) == {"A", "B", "D"}
    site = added.sites["D"]
    assert (site / "ca.crt").read_bytes() == (kits.coordinator / "ca.crt").read_bytes()
    assert "fl.example.org:9092" in (site / "site.yaml").read_text()
    assert (site / "site.pub").read_bytes().split()[:2] == \
        (kits.coordinator / "site-keys" / "D.pub").read_bytes().split()[:2]
    with pytest.raises(ProvisionError, match="already provisioned"):
        add_sites(["A"], tmp_path / "K")
    with pytest.raises(ProvisionError, match="no coordinator kit"):
        add_sites(["E"], tmp_path / "nothing")


def test_every_kit_has_the_roster_secure_aggregation_reads(tmp_path):
    """roster/ in the coordinator kit and every site kit: each site's identity public key, as
    keys.load_roster reads it, matching the site's own key; --add-sites refreshes every roster."""
    from aggregator.provision import ROSTER, add_sites
    from fed_unimiss.secure_aggregation.keys import load_identity_key, load_roster, roster_digest

    kits = provision(["A", "B"], tmp_path / "K")
    rosters = [load_roster(kit / ROSTER) for kit in (kits.coordinator, *kits.sites.values())]
    assert all(set(r) == {"A", "B"} for r in rosters)
    assert len({roster_digest(r) for r in rosters}) == 1
    for site, kit in kits.sites.items():
        own = load_identity_key(kit / "site.key").public_key()
        assert rosters[0][site].public_numbers() == own.public_numbers()
    assert not list((kits.coordinator / ROSTER).glob("*.key"))
    added = add_sites(["D"], tmp_path / "K")
    for kit in (kits.coordinator, *kits.sites.values(), added.sites["D"]):
        assert set(load_roster(kit / ROSTER)) == {"A", "B", "D"}


def _git(repo, *args):
    import subprocess

    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          check=True)


def test_provision_inside_a_git_work_tree_warns_unless_the_kits_are_ignored(tmp_path, capsys):
    """Kits hold private keys: `provision --out` in a repository that would commit them warns,
    naming the folder and the .gitignore line; an ignored folder or no repository is quiet."""
    from fed_unimiss.cli.main import main

    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    assert main(["provision", "--sites", "A,B", "--out", str(repo / "KITS")]) == 0
    err = capsys.readouterr().err
    assert f"warning: {repo / 'KITS'} is inside the git work tree" in err
    assert "'/KITS/'" in err and ".gitignore" in err and "private keys" in err
    # --add-sites into it warns again; once ignored, the same commands are quiet
    assert main(["provision", "--add-sites", "C", "--out", str(repo / "KITS")]) == 0
    assert "warning:" in capsys.readouterr().err
    (repo / ".gitignore").write_text("/KITS/\n")
    assert main(["provision", "--add-sites", "D", "--out", str(repo / "KITS")]) == 0
    assert _git(repo, "status", "--porcelain", "--untracked-files=all").stdout.strip() == \
        "?? .gitignore"
    assert "warning:" not in capsys.readouterr().err
    assert main(["provision", "--sites", "A", "--out", str(tmp_path / "outside")]) == 0
    assert "warning:" not in capsys.readouterr().err


def test_this_repository_ignores_the_kit_folders_the_guides_name():
    """The guides provision into KITS/ and hand out site-X/ folders: never committed here."""
    import shutil
    import subprocess

    repo = Path(__file__).resolve().parents[2]
    if shutil.which("git") is None or subprocess.run(
            ["git", "-C", str(repo), "rev-parse"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    for path in ("KITS/authority/ca.key", "KITS/coordinator/server.key", "site-A/site.key",
                 "runs/x/rounds.jsonl"):
        assert subprocess.run(["git", "-C", str(repo), "check-ignore", "-q", "--no-index",
                               path]).returncode == 0, path


def test_site_yaml_writes_every_setting_with_the_default_the_site_uses(kits, tmp_path, capsys):
    """The site guide says site.yaml holds the hardware settings: they are written, with the
    values the site would take anyway, and an edit there is what `site start` trains with."""
    import dataclasses
    import shutil

    import yaml

    from fed_unimiss.cli.main import main
    from fed_unimiss.data.phantom import write_phantoms
    from site_client.supernode import SiteSettings

    text = (kits.sites["A"] / "site.yaml").read_text()
    written = yaml.safe_load(text)
    assert {f.name for f in dataclasses.fields(SiteSettings)} <= set(written)
    defaults = SiteSettings()
    for key in ("device", "precision", "workers", "connect_timeout_s", "reconnect_grace_s",
                "state_dir"):
        assert written[key] == getattr(defaults, key), key
    for key in ("device:", "precision:", "workers:"):  # each with a comment saying its values
        line = next(ln for ln in text.splitlines() if ln.startswith(key))
        assert "#" in line, line

    kit = shutil.copytree(kits.sites["A"], tmp_path / "site-A")
    (kit / "site.yaml").write_text(text.replace("device: auto", "device: cpu")
                                   .replace("precision: fp32", "precision: bf16")
                                   .replace("workers: 1 ", "workers: 2 "))
    write_phantoms(tmp_path / "data", 0, 2, seed=1)
    code = main(["site", "start", "--kit", str(kit), "--data", str(tmp_path / "data"),
                 "--check-only"])
    out = capsys.readouterr().out
    assert code == 0 and "training on cpu in bf16 with 2 process(es)" in out, out
