"""Guards against non-finite training: a NaN/inf gradient never reaches the optimizer.

One optimizer step sees the gradient accumulated over its minibatches (all-reduced across processes
first, so every process decides alike). Its global norm ``||g||_2`` is NaN or inf exactly when some
element of the loss' gradient is, so one finite check on the norm covers loss and gradient:

    ||g||_2 finite  -> step (AdamW, LR scheduler, grad scaler as usual)
    otherwise       -> skip: zero the gradients; neither the optimizer, the LR scheduler nor
                       ``optimizer_steps`` advances (the LR schedule is a function of the updates
                       actually applied); counted in ``nonfinite_steps_skipped`` and warned about.

``train.max_consecutive_nonfinite`` skipped steps in a row stop the run with
:class:`NonFiniteError` (one line; the last checkpoint, written before, is kept and ``resume=true``
continues from it). With fp16 a non-finite gradient is first an overflow of the loss scale: the
scaler lowers its scale (``GradScaler.update``) and such skips count towards the limit only once
the scale is down to 1, where an overflow can no longer be the scale's doing.

The check costs one host synchronisation per optimizer step (not per minibatch).
"""

from __future__ import annotations

import logging
import math

import torch

from diffloop.errors import DiffloopError

logger = logging.getLogger(__name__)


class NonFiniteError(DiffloopError, RuntimeError):
    """Too many optimizer steps in a row had non-finite gradients; the message says what to do."""


def onpolicy_error_ok(err: float, clip_range: float) -> bool:
    """True when the on-policy |log p_theta - log p_old| is finite and within the clip range.

    Written as ``err <= clip_range`` so that NaN (which compares False with everything) fails.
    """
    return err <= clip_range


class NonFiniteGuard:
    """Decides, per optimizer step, whether its gradient may be applied; counts and limits skips.

    Args:
        max_consecutive: skipped steps in a row that stop the run
            (``train.max_consecutive_nonfinite``).
    """

    def __init__(self, max_consecutive: int) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive={max_consecutive} must be >= 1")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.epoch_skipped = 0

    def should_step(
        self, grad_norm: torch.Tensor, grad_scaler: torch.amp.GradScaler | None = None
    ) -> bool:
        """``grad_norm``: the global gradient norm of the step (0-dim). False: skip this step.

        Raises NonFiniteError on the ``max_consecutive``-th skip in a row.
        """
        norm = float(grad_norm)  # the one host sync per step
        if math.isfinite(norm):
            self.consecutive = 0
            return True
        self.epoch_skipped += 1
        scaling = (
            grad_scaler is not None and grad_scaler.is_enabled() and grad_scaler.get_scale() > 1
        )
        if not scaling:
            self.consecutive += 1
        logger.warning(
            "non-finite gradient (norm %s): optimizer step skipped%s (%d in a row; the run "
            "stops at train.max_consecutive_nonfinite=%d)",
            norm,
            " (fp16 loss-scale overflow)" if scaling else "",
            self.consecutive,
            self.max_consecutive,
        )
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"{self.consecutive} optimizer steps in a row had non-finite gradients (NaN/inf) "
                "and were skipped; the last checkpoint is kept: lower train.learning_rate, check "
                "the reward and train.adv_clip_max, then resume with resume=true "
                "(resume_allow=[train.learning_rate] to change it), or raise "
                "train.max_consecutive_nonfinite"
            )
        return False

    def take_epoch_count(self) -> int:
        """Steps skipped since the last call (once per epoch: ``nonfinite_steps_skipped``)."""
        count, self.epoch_skipped = self.epoch_skipped, 0
        return count
