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

from training import harness
from config import non_negative, within_one
from training.losses import adversarial_eps, adversarial_step, mixed_adversarial_loss
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
    within_one(cfg, "eps", "beta", "label_smoothing")  # beta > 1: a negative weight of the clean term


def loss_fn(model, x, y, mask, epoch, cfg):
    eps_t = adversarial_eps(epoch, cfg.eps, cfg.adv_start_epoch, cfg.epochs)
    return mixed_adversarial_loss(model, x, y, mask, eps_t, cfg.beta,
                                  adversarial_step(eps_t, cfg.pgd_alpha, cfg.pgd_steps), cfg.pgd_steps,
                                  label_smoothing=cfg.label_smoothing)


if __name__ == "__main__":
    sys.exit(harness.main(sys.modules[__name__]))
