"""Settings precedence (defaults < file < env < flags) and clear errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from inferd.config import Settings, env_name, flag_name, load_settings
from inferd.errors import ConfigError


def test_defaults_without_env_or_flags(tmp_path: Path) -> None:
    s = load_settings({}, env={"XDG_CACHE_HOME": str(tmp_path)})
    assert s.host == "127.0.0.1"
    assert s.port == 8000
    assert s.model == "smollm2-135m-instruct"
    assert s.cache_path == tmp_path / "inferd"
    assert s.profile == "default"
    assert not s.log_requests


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "inferd.yaml"
    cfg.write_text("port: 9001\nhost: 0.0.0.0\nlog_level: debug\n")
    env = {"INFERD_CONFIG": str(cfg), "INFERD_PORT": "9002"}
    s = load_settings({"port": "9003"}, env=env)
    assert s.host == "0.0.0.0"  # from the file
    assert s.log_level == "debug"  # from the file
    assert s.port == 9003  # flag beats env beats file
    assert load_settings({}, env=env).port == 9002


def test_flag_value_none_means_not_given() -> None:
    s = load_settings({"port": None}, env={"INFERD_PORT": "8123"})
    assert s.port == 8123


@pytest.mark.parametrize(
    ("raw", "expected"), [("1", True), ("true", True), ("YES", True), ("0", False), ("off", False)]
)
def test_bool_from_env(raw: str, expected: bool) -> None:
    assert load_settings({}, env={"INFERD_JSON_LOGS": raw}).json_logs is expected


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"INFERD_PORT": "eighty"}, "INFERD_PORT"),
        ({"INFERD_PORT": "70000"}, "out of range"),
        ({"INFERD_JSON_LOGS": "maybe"}, "INFERD_JSON_LOGS"),
        ({"INFERD_LOG_LEVEL": "loud"}, "not one of"),
        ({"INFERD_ENGINE_ARGS": "--x 'unclosed"}, "INFERD_ENGINE_ARGS"),
    ],
)
def test_bad_env_values_name_the_variable(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_settings({}, env=env)


def test_config_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("port: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings({}, env={}, config_file=bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("prot: 1\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        load_settings({}, env={}, config_file=unknown)
    with pytest.raises(ConfigError, match="config file"):
        load_settings({}, env={}, config_file=tmp_path / "missing.yaml")


def test_engine_args_are_shell_split() -> None:
    s = load_settings({"engine_args": "--max-model-len 2048 --chat-template '{{ x }}'"}, env={})
    assert s.engine_argv() == ["--max-model-len", "2048", "--chat-template", "{{ x }}"]


def test_engine_args_sections_go_to_their_engine_only() -> None:
    s = load_settings(
        {"engine_args": "--seed 1 vllm: --enforce-eager llamacpp: --mlock 'a b:'"}, env={}
    )
    assert s.engine_argv("vllm") == ["--seed", "1", "--enforce-eager"]
    assert s.engine_argv("llamacpp") == ["--seed", "1", "--mlock", "a b:"]
    assert s.engine_argv("other") == ["--seed", "1"]
    assert s.engine_argv() == ["--seed", "1", "--enforce-eager", "--mlock", "a b:"]


def test_a_key_in_an_engines_section_is_refused_too() -> None:
    with pytest.raises(ConfigError, match="inferd's to set"):
        load_settings({"engine_args": "vllm: --api-key=x"}, env={})


def test_names_are_derived_from_fields() -> None:
    assert env_name("cache_path") == "INFERD_CACHE_PATH"
    assert flag_name("cache_path") == "--cache-path"
    assert "cache_path" in Settings.__dataclass_fields__


@pytest.mark.parametrize("args", ["--api-key x", "--port 1 --api-key=x", "--api-key-file /k"])
def test_engine_args_cannot_set_the_engines_key(args: str) -> None:
    with pytest.raises(ConfigError, match="inferd's to set"):
        load_settings({"engine_args": args}, env={}).engine_argv()
