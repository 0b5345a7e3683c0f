"""The `logger` group's schema (conf/logger/): the tracker every phase logs to."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmstack.config.rules import Choice, require_choice

# the trackers `logger=` may name: the built-in ones, and each plug-in tracker once its module
# registers it (tracking/loggers.py `register_tracker` declares it here, before composition)
TRACKER_NAMES: list[str] = ["wandb", "mlflow", "csv", "none"]


def declare_tracker(name: str) -> None:
    if name not in TRACKER_NAMES:
        TRACKER_NAMES.append(name)


class WandbMode(Choice):
    auto = "auto"  # online when WANDB_API_KEY is set (or wandb is logged in), offline otherwise
    offline = "offline"
    online = "online"
    disabled = "disabled"


@dataclass
class LoggerConfig:
    # one of TRACKER_NAMES: an open set (plug-ins add to it), checked when the config is built
    name: str = "wandb"
    project: str = "lmstack"
    entity: str | None = None
    # wandb: auto is online when WANDB_API_KEY is set (or wandb is logged in), else offline
    mode: WandbMode = WandbMode.auto
    tags: list[str] = field(default_factory=list)
    # mlflow: the local store (SQLite database + artifacts), unless tracking_uri names a server
    store_dir: str = "outputs/mlflow"
    tracking_uri: str = ""

    def __post_init__(self) -> None:
        require_choice(self.name, tuple(TRACKER_NAMES), "logger.name")
