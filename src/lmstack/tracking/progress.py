"""The Trainer's progress bar, labelled for step-bounded training.

Lightning labels its bar "Epoch e/<max_epochs - 1>", which reads "Epoch 0/-2" when training
is bounded by `max_steps` (max_epochs=-1), as lmstack's runs are.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE


def train_description(current_epoch: int, max_epochs: int | None, max_steps: int) -> str:
    if max_epochs is not None and max_epochs >= 0:
        return f"Epoch {current_epoch}/{max_epochs - 1}"
    if max_steps and max_steps > 0:
        return f"Epoch {current_epoch} (to step {max_steps})"
    return f"Epoch {current_epoch}"


class StepBoundedRichBar(RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        return train_description(current_epoch, trainer.max_epochs, trainer.max_steps)


def progress_bar() -> Any:
    """Lightning's own default bar (rich when installed, else tqdm), labelled as above."""
    return StepBoundedRichBar() if _RICH_AVAILABLE else TQDMProgressBar()
