"""Offline preference objectives: one registry of pure loss functions, each with its own
hyper-parameter defaults (in its signature) and the name of the parameter that scales its
implicit reward.

>>> from prefalign import objectives
>>> dpo = objectives.get("dpo")
>>> loss = objectives.compute_loss(dpo, pc, pr, rc, rr, beta=0.1).mean()  # doctest: +SKIP
>>> run = objectives.resolve("dpo", params={"beta": 0.3})  # once per run
>>> run.reward_scale, run.params["label_smoothing"]
(0.3, 0.0)
"""

from prefalign.objectives.kto import kto_kl_reference_point, kto_loss
from prefalign.objectives.pairwise import (
    cell_loss,
    discopop_loss,
    dpo_loss,
    genarm_loss,
    hinge_loss,
    ipo_loss,
    log_ratio_margin,
    padll_loss,
    pfl_loss,
    robust_dpo_loss,
)
from prefalign.objectives.registry import (
    Objective,
    Resolved,
    compute_loss,
    get,
    load_user_objective,
    names,
    register,
    resolve,
)

__all__ = [
    "Objective",
    "Resolved",
    "cell_loss",
    "compute_loss",
    "discopop_loss",
    "dpo_loss",
    "genarm_loss",
    "get",
    "hinge_loss",
    "ipo_loss",
    "kto_kl_reference_point",
    "kto_loss",
    "load_user_objective",
    "log_ratio_margin",
    "names",
    "padll_loss",
    "pfl_loss",
    "register",
    "resolve",
    "robust_dpo_loss",
]
