"""ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model")
as a LightningModule: SFT on the chosen answer plus an odds-ratio term that pushes the odds of
the chosen answer above the rejected one's, in one stage and with no reference model.

Pairs are batched and packed as for DPO (objectives/pairs.py); the loss is
`losses.orpo_loss` on token-averaged log-probs.
"""

from __future__ import annotations

from typing import Any

from lmstack.objectives import Objective, ObjectiveSetup
from lmstack.objectives.losses import orpo_loss
from lmstack.objectives.pairs import preference_setup
from lmstack.objectives.reference_free import PairScores, ReferenceFreePairModule


def pair_loss(scores: PairScores, objective: Any) -> dict:
    return orpo_loss(scores.chosen_mean, scores.rejected_mean, scores.chosen_nll, objective.beta)


def setup(config: Any, loaded: Any, rows: Any) -> ObjectiveSetup:
    """Preference pairs, batched as all chosen rows then all rejected rows."""
    module = ReferenceFreePairModule(
        loaded.model, config.objective, config.trainer.max_steps, pair_loss
    )
    return preference_setup(config, loaded, rows, module, packing=config.data.packing)


# the objective's plug-in interface (lmstack.objectives.Objective)
OBJECTIVE = Objective(setup=setup)
