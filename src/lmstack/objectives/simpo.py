"""SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free
Reward") and, with `objective.loss_type=cpo`, CPO (Xu et al. 2024, "Contrastive Preference
Optimization") as a LightningModule; neither has a reference model.

SimPO's reward is the policy's token-averaged log-prob scaled by beta, with a target margin
gamma; CPO is DPO's sigmoid loss on summed log-probs without the reference, plus an NLL term
on the chosen answer (`cpo_alpha`). Pairs are batched and packed as for DPO
(objectives/pairs.py); the loss is `losses.simpo_loss`, TRL's `CPOTrainer.cpo_loss`.
"""

from __future__ import annotations

from typing import Any

from lmstack.objectives import Objective, ObjectiveSetup
from lmstack.objectives.losses import simpo_loss
from lmstack.objectives.pairs import preference_setup
from lmstack.objectives.reference_free import PairScores, ReferenceFreePairModule


def pair_loss(scores: PairScores, objective: Any) -> dict:
    # SimPO's reward is length-normalised; CPO's is DPO's, summed over the completion
    averaged = objective.loss_type == "simpo"
    return simpo_loss(
        scores.chosen_mean if averaged else scores.chosen_sum,
        scores.rejected_mean if averaged else scores.rejected_sum,
        beta=objective.beta,
        loss_type=objective.loss_type,
        gamma_beta_ratio=objective.gamma_beta_ratio,
        label_smoothing=objective.label_smoothing,
        chosen_nll=scores.chosen_nll,
        cpo_alpha=objective.cpo_alpha,
    )


def setup(config: Any, loaded: Any, rows: Any) -> ObjectiveSetup:
    """Preference pairs, batched as all chosen rows then all rejected rows."""
    module = ReferenceFreePairModule(
        loaded.model, config.objective, config.trainer.max_steps, pair_loss
    )
    return preference_setup(config, loaded, rows, module, packing=config.data.packing)


# the objective's plug-in interface (lmstack.objectives.Objective)
OBJECTIVE = Objective(setup=setup)
