"""One typed config tree (`tree`), read from TOML and `--section.key=value` overrides (`load`), described by
`--help` (`cli`). Import from here: `from fastpipe.config import load_config, Config, ConfigError`."""
from fastpipe.config.cli import argument_parser, help_text, key_help
from fastpipe.config.load import (
    find_config,
    from_dict,
    load_config,
    parse_overrides,
    to_toml,
    valid_keys,
    validate,
)
from fastpipe.config.tree import (
    CONFIG_DIR,
    SECTIONS,
    SMALL_IMAGE_DEFAULTS,
    SMALL_IMAGE_MAX_RESOLUTION,
    Config,
    ConfigError,
    DALIOptions,
    FFCVOptions,
    TorchOptions,
)

__all__ = ["CONFIG_DIR", "SECTIONS", "SMALL_IMAGE_DEFAULTS", "SMALL_IMAGE_MAX_RESOLUTION", "Config", "ConfigError",
           "DALIOptions", "FFCVOptions", "TorchOptions", "argument_parser", "find_config", "from_dict", "help_text",
           "key_help", "load_config", "parse_overrides", "to_toml", "valid_keys", "validate"]
