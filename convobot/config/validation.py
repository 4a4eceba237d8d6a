"""Composing configs with Hydra and checking them: a misspelt key (`peft.rr=8`), a wrong type (`peft.r=eight`) or a
missing value (`run_dir=???`) fails at start-up with the full key in the message instead of deep inside the work."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from convobot.config.commands import COMMAND_SCHEMAS
from convobot.config.training import TrainConfig
from convobot.errors import ConfigError

# The Hydra configs ship inside the package, so an installed wheel has them (the repo's conf/ links here).
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
COMMANDS_CONF_DIR = CONF_DIR / "commands"


def validate(cfg: DictConfig | dict, schema: type = TrainConfig):
    """Check a composed config against `schema` (and the schema's own `checks`); return it as a typed object.

    Raises ConfigError naming the offending key.
    """
    raw = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    raw = OmegaConf.masked_copy(raw, [k for k in raw.keys() if k != "hydra"])
    try:
        typed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), raw))
    except MissingMandatoryValue as err:
        raise ConfigError(f"config key '{err.full_key}': {err.full_key}=... is required") from err
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        message = str(getattr(err, "msg", err)).splitlines()[0]  # OmegaConf appends full_key/object_type lines
        raise ConfigError(f"config key '{key}': {message}") from err
    for key, holds, why in typed.checks() if hasattr(typed, "checks") else []:
        if not holds:
            raise ConfigError(f"config key '{key}' {why}")
    return typed


def to_container(cfg) -> dict:
    """Plain dict (enums as strings), for saving and reports."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"peft": {"r": 8}} -> {"peft.r": 8}; lists are kept as they are."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = value
    return flat


def compose(overrides: list[str] | None = None, config_name: str = "train", config_dir: Path = CONF_DIR) -> DictConfig:
    """Compose `conf/` (or `conf/commands/`) with Hydra's compose API (tests, notebooks, scripts)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides or []))


def compose_command(name: str, overrides: list[str] | None = None):
    """A release command's config from conf/commands/<name>.yaml, composed as its CLI does and validated."""
    return validate(compose(overrides, name, COMMANDS_CONF_DIR), COMMAND_SCHEMAS[name])
