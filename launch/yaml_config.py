"""Reading a YAML config file: YAML 1.2's floats, no key given twice, one-line errors."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from distq.launch.options import ConfigError


class _ConfigLoader(yaml.SafeLoader):
    """YAML with 1.2's floats (`1e-3` is a number, as users write it, not the string 1.1 makes
    it) that refuses a key given twice instead of keeping the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(
                    f"key {key!r} is given twice (line {key_node.start_mark.line + 1})"
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file (empty file: no settings)."""
    try:
        data = yaml.load(Path(path).read_text(), Loader=_ConfigLoader) or {}  # a SafeLoader
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"config file {str(path)!r}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values")
    return data
