"""Offline preference objectives: one registry of pure loss functions (METHODS.md section 1).

>>> from prefalign import objectives
>>> dpo = objectives.get("dpo")
>>> loss = objectives.compute_loss(dpo, pc, pr, rc, rr, beta=0.1).mean()  # doctest: +SKIP
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
    compute_loss,
    get,
    load_user_objective,
    names,
    register,
)

__all__ = [
    "Objective",
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
    "robust_dpo_loss",
]
