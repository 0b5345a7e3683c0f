"""The `logger` group's schema (conf/logger/): the tracker every phase logs to."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmstack.config.rules import Choice


class Logger(Choice):
    wandb = "wandb"
    mlflow = "mlflow"
    csv = "csv"
    none = "none"


class WandbMode(Choice):
    auto = "auto"  # online when WANDB_API_KEY is set (or wandb is logged in), offline otherwise
    offline = "offline"
    online = "online"
    disabled = "disabled"


LOGGERS = tuple(Logger)


@dataclass
class LoggerConfig:
    name: Logger = Logger.wandb
    project: str = "lmstack"
    entity: str | None = None
    # wandb: auto is online when WANDB_API_KEY is set (or wandb is logged in), else offline
    mode: WandbMode = WandbMode.auto
    tags: list[str] = field(default_factory=list)
    # mlflow: the local store (SQLite database + artifacts), unless tracking_uri names a server
    store_dir: str = "outputs/mlflow"
    tracking_uri: str = ""
