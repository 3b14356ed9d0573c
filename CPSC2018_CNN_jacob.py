"""Train with Jacobian regularization (PROTOCOL section 5, Jacobian).

    python CPSC2018_CNN_jacob.py                              # the paper's settings (exact term)
    python CPSC2018_CNN_jacob.py --jacobian_projections 1     # Hoffman et al.'s random projection

loss = CE + beta * sqrt(sum of squared input-gradient norms of all 9 logits) / (B * 9), the
second term from epoch ``reg_start_epoch`` on (0 in the paper: from the start).
"""
import sys

import torch.nn.functional as F

from training import harness
from training.losses import jacobian_loss
from plumbing.distributed import union_sum, unwrap

# The settings to edit; each is also a flag (types and presets: config.py). Shared (PROTOCOL section 5):
TRAINING = dict(epochs=70, batch_size=64, lr=1e-3)
# Jacobian regularization (each a finite non-negative number):
HYPERPARAMETERS = dict(
    beta=44.0,                # weight of the Jacobian term
    reg_start_epoch=0,        # epochs before this use CE alone
    jacobian_projections=0,   # 0: the exact Frobenius norm (paper); K > 0: K random projections
)
WHOLE_NUMBERS = ("reg_start_epoch", "jacobian_projections")  # the others take any number


def loss_fn(model, x, y, mask, epoch, cfg):
    loss1 = F.cross_entropy(model(x, mask), y)
    if epoch < cfg.reg_start_epoch:
        return loss1, {"loss_ce": loss1.detach()}
    # Over the whole batch: under torchrun, union_sum adds up the processes' shares (identity
    # otherwise); the input-gradient passes run on the plain module (see unwrap).
    loss2 = jacobian_loss(unwrap(model), x, mask, cfg.jacobian_projections,
                          reduce=union_sum)
    return loss1 + cfg.beta * loss2, {"loss_ce": loss1.detach(), "loss_jacobian": loss2.detach()}


if __name__ == "__main__":
    sys.exit(harness.main(sys.modules[__name__]))
