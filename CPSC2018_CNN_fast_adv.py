"""Train with fast adversarial training (Wong, Rice and Kolter, ICLR 2020), a baseline beyond the
paper (PROTOCOL section 10).

    python CPSC2018_CNN_fast_adv.py                  # eps 0.01, the paper's advls budget
    python CPSC2018_CNN_fast_adv.py --overfit_drop 1 # no stop on catastrophic overfitting

The paper's adversarial training (CPSC2018_CNN_ce_adv_pgd_ls.py) with its 20-step PGD replaced
by one FGSM step: a uniform random start in the eps_t ball, one step of fgsm_alpha * eps_t
(1.25 eps_t) along the sign of the CE loss's gradient, projected onto the ball and clipped to
[-1, 1], start and step on the signal only. Kept from the paper's script: the budget eps, its
schedule (plain CE before ``adv_start_epoch``, then linear to eps at the last epoch), the loss
(1 - beta) * CE(clean) + beta * sum CE(adversarial) / B over the correctly classified samples.
``--wong_loss 1`` trains on Wong et al.'s own loss instead, CE on every sample's FGSM input and no
clean term: two passes per step instead of three (PROTOCOL section 10).

Guard against catastrophic overfitting (Wong et al.'s early stop): from ``adv_start_epoch`` on,
at each epoch's end, the accuracy under PGD at eps (guard_pgd_steps steps of eps / 4, one random
start, model in eval mode) on a fixed class-balanced validation batch. When it falls by more than
``overfit_drop`` (a fraction) below its best, training stops and the run keeps the best epoch's
model (checkpoints/best.pt becomes model.pt; harness.train).
"""
import sys

import torch
import torch.nn.functional as F

import attacks
from training import harness
from config import non_negative, within_one
from training.losses import adversarial_eps, mixed_adversarial_loss
from plumbing.distributed import unwrap
from plumbing.flags import ConfigError

# The settings to edit; each is also a flag (types and presets: config.py). Shared (PROTOCOL section 5):
TRAINING = dict(epochs=70, batch_size=64, lr=1e-3)
# Fast adversarial training:
HYPERPARAMETERS = dict(
    eps=0.01,               # final L-inf budget (the paper's adversarial training's)
    beta=0.5,               # weight of the adversarial term (the paper's)
    adv_start_epoch=10,     # plain CE before this epoch (the paper's)
    fgsm_alpha=1.25,        # FGSM step = fgsm_alpha * eps_t (Wong et al.)
    overfit_drop=0.5,       # stop when the guard's PGD accuracy falls by more than this fraction of its best
    guard_pgd_steps=10,     # the guard's PGD: this many steps of eps / 4
    wong_loss=0,            # 1: Wong et al.'s own loss instead of the paper's mix (beta then unused)
)
WHOLE_NUMBERS = ("adv_start_epoch", "guard_pgd_steps", "wong_loss")  # the others take any number
GUARD_STEP = 0.25  # the guard's PGD step, a fraction of eps (Wong et al.'s check: 2/255 at eps 8/255)
GUARD_SEED = 0  # the guard's random starts: the same every epoch, so that its accuracies compare


def check_hyperparameters(cfg):
    non_negative(cfg, *HYPERPARAMETERS)
    if cfg.guard_pgd_steps < 1:
        raise ConfigError(f"--guard_pgd_steps must be at least 1, got {cfg.guard_pgd_steps}")
    within_one(cfg, "eps", "beta", "overfit_drop")
    if cfg.wong_loss not in (0, 1):
        raise ConfigError(f"--wong_loss must be 0 (the paper's loss mix) or 1 (Wong et al.'s loss), got {cfg.wong_loss}")


def loss_fn(model, x, y, mask, epoch, cfg):
    eps_t = adversarial_eps(epoch, cfg.eps, cfg.adv_start_epoch, cfg.epochs)
    if cfg.wong_loss:
        return wong_loss(model, x, y, mask, eps_t, cfg.fgsm_alpha * eps_t)
    return mixed_adversarial_loss(model, x, y, mask, eps_t, cfg.beta, cfg.fgsm_alpha * eps_t, 1,
                                  attack_loss=attacks.ce_loss)


def wong_loss(model, x, y, mask, eps_t, step_size):
    """Wong et al.'s loss: CE on the FGSM input of every sample, no clean term, so a step costs two
    passes (the paper's mix adds a clean one). The FGSM step runs on the plain module; the trained-on
    pass goes through ``model`` (DDP's wrapper under torchrun, which averages the gradients)."""
    x_adv = x if eps_t == 0 else attacks.pgd_attack(
        unwrap(model), x, y, mask, eps_t, norm="inf", steps=1, step_size=step_size, random_start=True,
        restarts=1, early_stop=False, loss_fn=attacks.ce_loss)
    loss = F.cross_entropy(model(x_adv, mask), y)
    return loss, {"loss_adv": loss.detach(), "eps_t": eps_t}


def guard(model, x, y, mask, epoch, cfg) -> float | None:
    """The accuracy under PGD at the final eps on the guard's batch; None before adversarial
    training starts (a CE model's robust accuracy says nothing about overfitting to FGSM)."""
    if epoch < cfg.adv_start_epoch:
        return None
    generator = torch.Generator(x.device).manual_seed(GUARD_SEED)
    was_training = model.training
    model.eval()
    try:
        x_adv = attacks.pgd_attack(model, x, y, mask, cfg.eps, "inf", steps=cfg.guard_pgd_steps,
                                   step_size=GUARD_STEP * cfg.eps, restarts=1, generator=generator)
        with torch.no_grad():
            return (model(x_adv, mask).argmax(dim=1) == y).float().mean().item()
    finally:
        model.train(was_training)


if __name__ == "__main__":
    sys.exit(harness.main(sys.modules[__name__]))
