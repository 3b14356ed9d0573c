"""Train with noise-to-signal-ratio regularization (PROTOCOL section 5, NSR).

    python CPSC2018_CNN_NSR.py                          # the paper's settings
    python CPSC2018_CNN_NSR.py --beta2 0.5 --preset demo

loss = MSE to the one-hot label + beta1 * multi-margin + beta2 * log(1 + NSR), the last
two from epoch ``reg_start_epoch`` on and only over the correctly classified samples.
"""
import sys

from training import harness
from training.losses import mse_onehot_loss, multi_margin_loss, nsr_loss
from plumbing.distributed import union_sum, unwrap

# The settings to edit; each is also a flag (types and presets: config.py). Shared (PROTOCOL section 5):
TRAINING = dict(epochs=70, batch_size=64, lr=1e-3)
# Noise-to-signal-ratio regularization (each a finite non-negative number):
HYPERPARAMETERS = dict(
    beta1=1.0,            # weight of the multi-margin term
    beta2=1.0,            # weight of the noise-to-signal-ratio term
    reg_start_epoch=10,   # epochs before this use the MSE term alone
)
WHOLE_NUMBERS = ("reg_start_epoch",)  # the others take any number


def loss_fn(model, x, y, mask, epoch, cfg):
    logits = model(x, mask)
    loss1 = mse_onehot_loss(logits, y)
    if epoch < cfg.reg_start_epoch:
        return loss1, {"loss_mse": loss1.detach()}
    correct = logits.argmax(dim=1) == y
    # Counts and sums over the whole batch: under torchrun, union_sum adds up the processes'
    # shares so that loss2 and loss3 are those of the single-process batch (identity otherwise).
    n = int(union_sum(correct.sum()))
    if n == 0:
        return loss1, {"loss_mse": loss1.detach(), "loss_margin": 0.0, "loss_nsr": 0.0}
    loss2 = multi_margin_loss(logits[correct], y[correct], reduce=union_sum)
    plain_model = unwrap(model)  # the input-gradient pass runs on the plain module
    loss3 = union_sum(nsr_loss(plain_model, x[correct], y[correct], mask[correct])) / n
    loss = loss1 + cfg.beta1 * loss2 + cfg.beta2 * loss3
    return loss, {"loss_mse": loss1.detach(), "loss_margin": loss2.detach(), "loss_nsr": loss3.detach()}


if __name__ == "__main__":
    sys.exit(harness.main(sys.modules[__name__]))
