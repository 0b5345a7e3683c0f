"""What every group's schema builds on: closed sets of choices, and the checks that name the key
a value is wrong for (a ConfigError: exit 2, no traceback)."""

from __future__ import annotations

from enum import StrEnum

from lmstack.errors import ConfigError


class Choice(StrEnum):
    """A closed set of choices: Hydra refuses any other value at composition, naming the key
    and the choices; a member compares, hashes, formats and serialises as its string."""


def require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def require_choice(value: str, choices: tuple[str, ...], key: str) -> None:
    require(value in choices, key, f"'{value}' is not one of {', '.join(choices)}")
