"""Settings: defaults < config file < INFERD_* environment < flags (see `settings`)."""

from inferd.config.settings import (
    SETTINGS_FIELDS,
    Settings,
    env_name,
    flag_name,
    load_settings,
)

__all__ = ["SETTINGS_FIELDS", "Settings", "env_name", "flag_name", "load_settings"]
