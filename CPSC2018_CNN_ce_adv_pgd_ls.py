"""Train with PGD adversarial training, "advls" (PROTOCOL section 5, adversarial training).

    python CPSC2018_CNN_ce_adv_pgd_ls.py                  # eps 0.01, the paper's default
    python CPSC2018_CNN_ce_adv_pgd_ls.py --eps 0.05       # the paper also trains 0.005, 0.05, 0.1
    python CPSC2018_CNN_ce_adv_pgd_ls.py --label_smoothing 0.1

From epoch ``adv_start_epoch`` the correctly classified samples of each batch are attacked
with 20-step L-inf PGD (soft logit-margin loss, random start, budget growing linearly to
eps at the last epoch) and loss = (1 - beta) * CE(clean) + beta * sum CE(adversarial) / B in
every batch, the adversarial term 0 before that epoch and in batches with no correct sample.
"ls" is read two ways: the reference code's soft logit-margin attack loss (always used)
and, as an option, label smoothing of both CE terms (default 0, as in the reference code).
"""
import sys

import torch.nn.functional as F

import harness
from config import non_negative
from losses import adversarial_eps, adversarial_loss, adversarial_step
from plumbing.distributed import union_sum, unwrap
from plumbing.flags import ConfigError

# The settings to edit; each is also a flag (types and presets: config.py). Shared (PROTOCOL section 5):
TRAINING = dict(epochs=70, batch_size=64, lr=1e-3)
# PGD adversarial training:
HYPERPARAMETERS = dict(
    eps=0.01,               # final L-inf budget
    beta=0.5,               # weight of the adversarial term
    adv_start_epoch=10,     # plain CE before this epoch
    pgd_steps=20,
    pgd_alpha=4.0,          # step size = pgd_alpha * eps_t / pgd_steps
    label_smoothing=0.0,    # of the CE terms; 0 reproduces the reference code
)
WHOLE_NUMBERS = ("adv_start_epoch", "pgd_steps")  # the others take any number


def check_hyperparameters(cfg):
    non_negative(cfg, *HYPERPARAMETERS)
    if cfg.pgd_steps < 1:
        raise ConfigError(f"--pgd_steps must be at least 1, got {cfg.pgd_steps}")
    # beta > 1 would give the clean term a negative weight; the inputs are scaled to [-1, 1], so an
    # eps beyond 1 perturbs by more than half their range (the paper's largest is 0.1).
    for key in ("eps", "beta", "label_smoothing"):
        if getattr(cfg, key) > 1:
            raise ConfigError(f"--{key} must be between 0 and 1, got {getattr(cfg, key):g}")


def loss_fn(model, x, y, mask, epoch, cfg):
    logits = model(x, mask)
    loss1 = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
    eps_t = adversarial_eps(epoch, cfg.eps, cfg.adv_start_epoch, cfg.epochs)
    correct = logits.argmax(dim=1) == y
    # The loss keeps its weights in every batch (the original's): the adversarial term is 0
    # before adv_start_epoch and when no sample is correct. Whether to attack is decided over
    # the whole batch (all processes under torchrun); the attack and the adversarial pass run
    # on the plain module (see unwrap).
    if eps_t == 0 or not union_sum(correct.sum()):
        return (1 - cfg.beta) * loss1, {"loss_ce": loss1.detach(), "loss_adv": 0.0}
    loss2 = adversarial_loss(unwrap(model), x[correct], y[correct], mask[correct], eps_t,
                             adversarial_step(eps_t, cfg.pgd_alpha, cfg.pgd_steps),
                             steps=cfg.pgd_steps, label_smoothing=cfg.label_smoothing) / len(y)
    loss = (1 - cfg.beta) * loss1 + cfg.beta * loss2
    return loss, {"loss_ce": loss1.detach(), "loss_adv": loss2.detach(), "eps_t": eps_t}


if __name__ == "__main__":
    sys.exit(harness.main(sys.modules[__name__]))
