"""Train with TRADES (Zhang et al., ICML 2019), a baseline beyond the paper (PROTOCOL section 10).

    python CPSC2018_CNN_trades.py                  # eps 0.01 (the paper's advls budget), beta 6
    python CPSC2018_CNN_trades.py --beta 1 --eps 0.05

loss = CE(f(x), y) + beta * sum_i KL(softmax f(x_i) || softmax f(x'_i)) / B, x' from L-inf PGD
ascending that KL (losses.trades_attack: start x + 0.001 N(0, 1), ``pgd_steps`` steps of
pgd_alpha * eps_t / pgd_steps, i.e. eps_t / 4 by default, noise and steps on the signal only).
The budget follows the paper's adversarial script (losses.adversarial_eps): 0 (plain CE)
before ``adv_start_epoch``, then growing linearly to eps at the last epoch.
"""
import sys

import torch.nn.functional as F

from training import harness
from config import non_negative, within_one
from training.losses import adversarial_eps, adversarial_step, trades_attack, trades_kl
from plumbing.distributed import unwrap
from plumbing.flags import ConfigError

# The settings to edit; each is also a flag (types and presets: config.py). Shared (PROTOCOL section 5):
TRAINING = dict(epochs=70, batch_size=64, lr=1e-3)
# TRADES (the published CIFAR-10 setting: beta 6, 10 steps of eps / 4):
HYPERPARAMETERS = dict(
    eps=0.01,               # final L-inf budget (the paper's adversarial training's)
    beta=6.0,               # weight of the KL term
    adv_start_epoch=10,     # plain CE before this epoch (the paper's adversarial schedule)
    pgd_steps=10,
    pgd_alpha=2.5,          # step size = pgd_alpha * eps_t / pgd_steps (eps_t / 4)
)
WHOLE_NUMBERS = ("adv_start_epoch", "pgd_steps")  # the others take any number


def check_hyperparameters(cfg):
    non_negative(cfg, *HYPERPARAMETERS)
    if cfg.pgd_steps < 1:
        raise ConfigError(f"--pgd_steps must be at least 1, got {cfg.pgd_steps}")
    within_one(cfg, "eps")


def loss_fn(model, x, y, mask, epoch, cfg):
    logits = model(x, mask)
    loss_ce = F.cross_entropy(logits, y)
    eps_t = adversarial_eps(epoch, cfg.eps, cfg.adv_start_epoch, cfg.epochs)
    if eps_t == 0:
        return loss_ce, {"loss_ce": loss_ce.detach(), "loss_kl": 0.0}
    # The attack and the adversarial pass run on the plain module (see unwrap); the KL is summed
    # over this process's samples and divided by their number, as the CE is averaged (DDP then
    # averages the processes' gradients).
    plain_model = unwrap(model)
    x_adv = trades_attack(plain_model, x, mask, eps_t, adversarial_step(eps_t, cfg.pgd_alpha, cfg.pgd_steps),
                          cfg.pgd_steps)
    loss_kl = trades_kl(logits, plain_model(x_adv, mask)) / len(y)
    return loss_ce + cfg.beta * loss_kl, {"loss_ce": loss_ce.detach(), "loss_kl": loss_kl.detach(), "eps_t": eps_t}


if __name__ == "__main__":
    sys.exit(harness.main(sys.modules[__name__]))
