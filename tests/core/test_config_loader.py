"""The YAML -> dataclass loader: every mistake names the field and what was expected."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from fed_unimiss.config import ConfigError, from_dict, load_yaml, replace, to_dict


@dataclass(frozen=True)
class Inner:
    depth: int = 2
    mode: Literal["volume", "slice"] = "volume"


@dataclass(frozen=True)
class Outer:
    lr: float = 1e-3
    dims: tuple[int, ...] = (1, 2)
    spacing: tuple[float, float, float] = (3.0, 1.0, 1.0)
    name: str | None = None
    inner: Inner = field(default_factory=Inner)

    def validate(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def test_defaults_and_nested_values():
    cfg = from_dict(Outer, {"lr": "1e-4", "dims": [4, 5, 6], "inner": {"mode": "slice"}})
    assert cfg.lr == pytest.approx(1e-4)
    assert cfg.dims == (4, 5, 6)
    assert cfg.inner == Inner(depth=2, mode="slice")
    assert to_dict(cfg)["dims"] == [4, 5, 6]


@pytest.mark.parametrize(
    "data, message",
    [
        ({"lrr": 1}, "config.lrr: unknown field; did you mean 'lr'?"),
        ({"dims": 3}, "config.dims: expected a list of int, got 3"),
        ({"spacing": [1, 2]}, "config.spacing: expected 3 values, got 2"),
        ({"inner": {"mode": "cube"}}, "config.inner.mode: expected one of 'volume' or 'slice'"),
        ({"inner": {"depth": True}}, "config.inner.depth: expected an integer, got True"),
        ({"lr": -1}, "lr must be > 0, got -1.0"),
    ],
)
def test_errors_name_the_field(data, message):
    with pytest.raises(ConfigError) as e:
        from_dict(Outer, data)
    assert message in str(e.value)


def test_load_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lr: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_yaml(Outer, path)
    path.write_text("section:\n  lr: 0.5\n")
    assert load_yaml(Outer, path, section="section").lr == 0.5
    with pytest.raises(ConfigError, match="missing top-level section 'other'"):
        load_yaml(Outer, path, section="other")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_yaml(Outer, tmp_path / "missing.yaml")


def test_replace_ignores_none():
    cfg = Outer()
    assert replace(cfg, lr=None) is cfg
    assert replace(cfg, lr=0.1, name=None).lr == 0.1
