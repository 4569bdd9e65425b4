"""ESD: Entropic Score Distillation (Wang et al. 2024, "Taming Mode Collapse in Score Distillation for
Text-to-3D Generation", CVPR 2024, Sec. 4, Eq. 9-11).

ESD adds the entropy of the generated distribution back into score distillation. Its gradient is
``d x / d theta . (score_teacher(x_t | y) - lambda score_q(x_t | empty) - (1 - lambda) score_q(x_t | c))`` where
``c`` is the variable whose spread the entropy should keep (the camera in text-to-3D). For a one-step 2-D
generator ``x = G(z, y)`` the conditioning variable is the **generator noise z** (METHODS.md Sec. 5), so that
the entropy is taken across the samples of one prompt. The z-conditional distribution of ``x_t`` is
``N(alpha x, sigma^2)``, whose x0 prediction is ``x`` itself, hence ``p_cond = x - x = 0`` and, in DMD2's
notation (``p = x - x0_pred``)::

    grad = (p_real - lambda p_fake) / mean_{CHW}|p_real|

``lambda`` is ``entropy_weight``: ``1`` is DMD / Diff-Instruct (this class then *is* DMD2, bit for bit),
``0`` is SDS (mode seeking: the student collapses onto the teacher's modes), ``lambda > 1`` raises diversity
(near ``t -> 0`` it matches a tempered teacher ``p^(1/lambda)``, which counteracts CFG's sharpening).
Diversity is monotone in ``lambda`` but not calibrated. Mixing prompt-conditional and unconditional fake
scores is *not* ESD (it sharpens prompts like CFG and reduces within-prompt diversity).

Everything else (fake score, TTUR, GAN head, backward simulation) is DMD2's. ProlificDreamer's VSD trains
the fake score as a LoRA of the teacher (rank small, lr 1e-4, plain eps/v MSE at all times): set
``fake_score.lora`` in the recipe (``distill.models.roles.add_lora`` adapts diffusers UNets and toy MLPs alike).
"""
from __future__ import annotations

from dataclasses import dataclass

from distill.methods.dmd2 import DMD2, DMD2Config


@dataclass
class ESDConfig(DMD2Config):
    entropy_weight: float = 1.0  # ESD's lambda: 0 = SDS, 1 = DMD, > 1 = more diversity


class ESD(DMD2):
    """DMD2 with the fake score's term weighted by ESD's ``lambda`` (``config.entropy_weight``)."""

    config_class = ESDConfig

    def __init__(self, teacher, student, fake_score, config: ESDConfig, example_batch=None):
        super().__init__(teacher, student, fake_score, config, example_batch)
        self.fake_weight = float(config.entropy_weight)
