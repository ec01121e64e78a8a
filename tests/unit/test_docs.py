"""The README's configuration table lists every setting, with its env variable and flag."""

from __future__ import annotations

from inferd.config import SETTINGS_FIELDS, env_name, flag_name
from tests.conftest import REPO


def test_every_setting_is_documented() -> None:
    readme = (REPO / "README.md").read_text()
    for f in SETTINGS_FIELDS:
        assert f"| {f.name} | `{env_name(f.name)}` |" in readme, f.name
        if f.name != "model":
            assert f"`{flag_name(f.name)}`" in readme, f.name
