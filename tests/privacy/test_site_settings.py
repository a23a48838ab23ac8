"""A site's DP settings: site.yaml + ``site start --dp-*`` flags -> node config -> PrivacyConfig.

(``require_dp`` is exercised over a real in-process federation in test_require_dp.py.)"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import tomli_w

from aggregator.provision import provision
from fed_unimiss import exchange as ex
from fed_unimiss.privacy import PrivacyConfig
from site_client.privacy_ledger import privacy_node_config, site_privacy
from site_client.supernode import (
    SiteError,
    load_site_kit,
    site_node_config,
    site_privacy_settings,
)


@pytest.fixture(scope="module")
def kit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return provision(["A"], tmp_path_factory.mktemp("dpkit") / "KITS").sites["A"]


def _node_config_roundtrip(kit, privacy: PrivacyConfig, tmp_path: Path) -> dict:
    """What flower-supernode reads: the TOML file run_supernode writes, parsed back."""
    path = tmp_path / "node-config.toml"
    path.write_bytes(tomli_w.dumps(site_node_config(kit, tmp_path, tmp_path / "st",
                                                    privacy)).encode())
    return tomllib.loads(path.read_text())


def test_provisioned_template_has_dp_off_and_flags_turn_it_on(kit_dir, tmp_path):
    kit = load_site_kit(kit_dir)
    assert "privacy:" in (kit_dir / "site.yaml").read_text()
    off = site_privacy_settings(kit, {"dp_epsilon": None})
    assert not off.enabled
    node = _node_config_roundtrip(kit, off, tmp_path)
    assert not any(k.startswith("dp-") for k in node)
    assert site_privacy(node) is None

    on = site_privacy_settings(kit, {"dp_epsilon": 3.0, "dp_delta": 1e-6, "dp_clip": 0.5})
    assert (on.enabled, on.target_epsilon, on.target_delta, on.max_grad_norm) == (
        True, 3.0, 1e-6, 0.5)
    assert on.planned_rounds == kit.settings.privacy.planned_rounds  # from site.yaml
    node = _node_config_roundtrip(kit, on, tmp_path)
    assert (node["dp-epsilon"], node["dp-delta"], node["dp-clip"]) == (3.0, 1e-6, 0.5)
    assert node[ex.NODE_SITE_NAME] == "A" and ex.NODE_DATA_PATH in node
    assert site_privacy(node) == on


def test_site_yaml_privacy_section_and_flag_override(kit_dir, tmp_path):
    kit_copy = tmp_path / "kit"
    kit_copy.mkdir()
    for f in kit_dir.iterdir():
        if f.is_file():
            (kit_copy / f.name).write_bytes(f.read_bytes())
    (kit_copy / "site.key").chmod(0o600)
    text = (kit_dir / "site.yaml").read_text().replace("enabled: false", "enabled: true")
    text = text.replace("target_epsilon: 8.0", "target_epsilon: 5.0")
    (kit_copy / "site.yaml").write_text(text + "  center: gaussian\n  noise_multiplier: 1.5\n")
    kit = load_site_kit(kit_copy)
    from_yaml = site_privacy_settings(kit, {})
    assert from_yaml.enabled and from_yaml.target_epsilon == 5.0
    flagged = site_privacy_settings(kit, {"dp_epsilon": 2.0, "dp_planned_rounds": 4})
    assert (flagged.target_epsilon, flagged.planned_rounds, flagged.center,
            flagged.noise_multiplier) == (2.0, 4, "gaussian", 1.5)
    node = _node_config_roundtrip(kit, flagged, tmp_path)
    assert site_privacy(node) == flagged
    assert privacy_node_config(PrivacyConfig()) == {}

    (kit_copy / "site.yaml").write_text(text.replace("target_delta: 1.0e-5", "target_delta: 2"))
    with pytest.raises(SiteError, match=r"site\.yaml.*target_delta"):
        load_site_kit(kit_copy)


def test_dp_flags_without_dp_and_bad_values_are_clear_errors(kit_dir):
    kit = load_site_kit(kit_dir)
    with pytest.raises(SiteError, match="--dp-clip given but differential privacy is off"):
        site_privacy_settings(kit, {"dp_clip": 0.5})
    with pytest.raises(SiteError, match="target_epsilon: must be > 0") as e:
        site_privacy_settings(kit, {"dp_epsilon": -1.0})
    assert e.value.code == 2


def test_site_start_cli_rejects_a_bad_dp_flag_before_the_network(kit_dir, tmp_path, capsys):
    from fed_unimiss.cli.main import main

    code = main(["site", "start", "--kit", str(kit_dir), "--data", str(tmp_path),
                 "--dp-delta", "1e-6"])
    assert code == 2
    assert "--dp-delta given but differential privacy is off" in capsys.readouterr().err


def test_dp_refuses_recipes_it_cannot_train_soundly():
    from dataclasses import replace as dc_replace
    from pathlib import Path

    import pytest

    from fed_unimiss.ssl.config import load_recipe
    from fed_unimiss.ssl.dp_step import check_dp_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[2] / "configs/pretrain/micro.yaml")
    with pytest.raises(ValueError, match="model.head_weight_norm: DP training needs"):
        check_dp_recipe(dc_replace(recipe, model=dc_replace(recipe.model, head_weight_norm=True)))
    plain = dc_replace(recipe, model=dc_replace(recipe.model, head_weight_norm=False),
                       ssl=dc_replace(recipe.ssl, koleo_weight=0.0))
    check_dp_recipe(plain)
    with pytest.raises(ValueError, match="ssl.koleo_weight: DP training needs 0"):
        check_dp_recipe(dc_replace(plain, ssl=dc_replace(plain.ssl, koleo_weight=1.0)))
    sinkhorn = dc_replace(plain, ssl=dc_replace(plain.ssl, teacher_centering="sinkhorn"))
    with pytest.raises(ValueError, match="ssl.teacher_centering: DP training needs 'center'"):
        check_dp_recipe(sinkhorn)


def test_refusing_the_plan_travels_from_the_flag_to_the_client(kit_dir, tmp_path):
    """site.yaml adopts the federation's DP plan; --dp-refuse-plan turns that off, and the
    choice reaches the ClientApp through the node config."""
    import argparse

    from site_client.cli import register

    kit = load_site_kit(kit_dir)
    assert kit.settings.privacy.adopt_plan is True  # the provisioned template says so
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["site", "start", "--kit", str(kit_dir), "--data", str(tmp_path),
                              "--dp-epsilon", "8", "--dp-refuse-plan"])
    privacy = site_privacy_settings(kit, {"dp_epsilon": args.dp_epsilon,
                                          "dp_adopt_plan": args.dp_adopt_plan})
    assert privacy.adopt_plan is False
    assert site_privacy(_node_config_roundtrip(kit, privacy, tmp_path)).adopt_plan is False
