"""Adversarial attacks for any model called as ``model(x, mask)`` (PROTOCOL section 6): the
paper's PGD and IFGSM, their losses, and the input checks that ``autoattack`` and ``noises`` share.

Inputs follow the project's batch convention: x (B, leads, T) with values in [-1, 1],
y (B,) int64 labels and mask (B, 1, T) with 1 on signal samples and 0 on padding.
Every function is stateless: randomness comes from an optional ``torch.Generator`` (the
global generator when None), the model's train/eval mode is never changed, and gradients
are taken with ``torch.autograd.grad`` with respect to the input only, so no ``.grad`` is
left on the model's parameters.

- ``pgd_attack`` / ``ifgsm_attack``: white-box L-inf or L2 PGD with optional early stop
  and restarts (the paper's evaluation) or a plain fixed-iteration run (adversarial
  training).
- Losses to ascend: ``ce_loss``, ``soft_margin_loss`` and ``dlr_loss`` (summed over the
  batch), ``margins``, ``dlr_losses`` and ``dlr_targeted_losses`` per sample.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

L2_GRAD_EPS = 1e-12  # keeps the L2-normalized gradient finite where the gradient vanishes
DLR_EPS = 1e-12  # keeps the DLR loss finite when the top three logits tie

_NORM_ALIASES = {"inf": "inf", "linf": "inf", "l-inf": "inf", "2": "2", "l2": "2"}


# ----------------------------------------------------------------------------- losses

def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the batch."""
    return F.cross_entropy(logits, y, reduction="sum")


def _own_and_others(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_y per sample, the logits with z_y replaced by -inf)."""
    own = logits.gather(1, y[:, None]).squeeze(1)
    return own, logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))


def soft_margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Soft logit margin ``sum_i [logsumexp_{j != y_i} z_ij - z_{i,y_i}]`` (PROTOCOL section 5)."""
    own, others = _own_and_others(logits, y)
    return (torch.logsumexp(others, dim=1) - own).sum()


def margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample logit margin ``z_y - max_{i != y} z_i`` (negative: misclassified)."""
    own, others = _own_and_others(logits, y)
    return own - others.amax(dim=1)


def dlr_losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample difference-of-logits-ratio loss (Croce and Hein, ICML 2020, eq. 4):
    ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)``, z_pi1 >= z_pi2 >= z_pi3 the top
    three logits. Invariant to shifting and scaling the logits, which is why it still
    works where the cross-entropy saturates. Needs at least 3 classes."""
    if logits.shape[1] < 3:
        raise ValueError(f"the DLR loss needs at least 3 classes, got {logits.shape[1]}")
    top = logits.topk(3, dim=1).values
    return -margins(logits, y) / (top[:, 0] - top[:, 2] + DLR_EPS)


def dlr_targeted_losses(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample targeted DLR loss (Croce and Hein, ICML 2020, eq. 5):
    ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)``, t the target class and
    z_pi1 >= ... >= z_pi4 the top four logits; ascending it pushes z_t above z_y. Needs at
    least 4 classes."""
    if logits.shape[1] < 4:
        raise ValueError(f"the targeted DLR loss needs at least 4 classes, got {logits.shape[1]}")
    top = logits.topk(4, dim=1).values
    own, aimed = (logits.gather(1, labels[:, None]).squeeze(1) for labels in (y, target))
    return -(own - aimed) / (top[:, 0] - (top[:, 2] + top[:, 3]) / 2 + DLR_EPS)


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The DLR loss summed over the batch (a ``loss_fn`` for ``pgd_attack``)."""
    return dlr_losses(logits, y).sum()


# ----------------------------------------------------------------------------- checks (autoattack's and noises' too)

def parse_norm(norm: str | int | float) -> str:
    """Return "inf" or "2" for the accepted spellings of the L-inf and L2 norms."""
    if isinstance(norm, (int, float)) and not isinstance(norm, bool):
        key = "inf" if norm == math.inf else "2" if norm == 2 else None
    else:
        key = _NORM_ALIASES.get(str(norm).strip().lower())
    if key is None:
        raise ValueError(f"norm {norm!r} is not supported: use 'inf' (L-inf) or 2 (L2)")
    return key


def check_eps(eps: float, name: str = "eps") -> float:
    """Return ``eps`` as a float; ValueError naming ``name`` unless it is finite and >= 0."""
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {eps}")
    return eps


def check_batch(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Check x (B, leads, T) against mask (B, 1, T); return the mask in x's dtype."""
    if x.dim() != 3:
        raise ValueError(f"x must have shape (batch, leads, time), got {tuple(x.shape)}")
    if mask.shape != (x.shape[0], 1, x.shape[2]):
        raise ValueError(f"mask must have shape {(x.shape[0], 1, x.shape[2])} for x of shape "
                         f"{tuple(x.shape)}, got {tuple(mask.shape)}")
    return mask.detach().to(dtype=x.dtype)


def check_inputs(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Check x, y and mask of one batch; return x detached and the mask in x's dtype."""
    x = x.detach()
    mask = check_batch(x, mask)
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape {(x.shape[0],)}, got {tuple(y.shape)}")
    return x, mask


def per_sample(t: torch.Tensor) -> torch.Tensor:
    """Reshape a (B,) tensor to broadcast over (B, leads, T)."""
    return t.view(-1, 1, 1)


def l2_norms(t: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm over all leads and times, shaped (B, 1, 1)."""
    return per_sample(torch.linalg.vector_norm(t.flatten(1), dim=1))


def project_onto_ball(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project each sample's delta onto the eps ball (in place for L-inf)."""
    if norm == "inf":
        return delta.clamp_(-eps, eps)
    lengths = l2_norms(delta)
    return delta * torch.where(lengths > eps, eps / lengths, torch.ones_like(lengths))


# ----------------------------------------------------------------------------- PGD

def _run_start(model: Model, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
               x_adv: torch.Tensor, active: torch.Tensor | None, eps: float, norm: str,
               step: float, steps: int, random_start: bool, loss_fn: LossFn,
               generator: torch.Generator | None, check_last: bool
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One PGD start from x for the ``active`` samples; the others keep ``x_adv``.

    ``active`` None means no early stop: every sample runs every iteration. Otherwise a
    sample predicted wrongly at an iterate is frozen there and dropped from ``active``;
    ``check_last`` also tests the final iterate (needed before another start).
    Returns the new x_adv and the samples still correctly classified.
    """
    update_mask = mask if active is None else mask * per_sample(active.to(x.dtype))
    if random_start:
        delta = eps * (2 * torch.rand(x.shape, generator=generator, device=x.device,
                                      dtype=x.dtype) - 1) * update_mask
        if norm == "2":
            delta = project_onto_ball(delta, eps, norm)
        start = (x + delta).clamp_(-1, 1)
    else:
        start = x
    x_adv = start.clone() if active is None else torch.where(per_sample(active), start, x_adv)

    for _ in range(steps):
        x_req = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(x_req, mask)
            if active is not None:
                # Freeze the samples already fooled at this iterate, before the update.
                active = active & (logits.detach().argmax(dim=1) == y)
                if not bool(active.any()):  # the one host sync early stop needs
                    return x_adv, active
                update_mask = mask * per_sample(active.to(x.dtype))
            (grad,) = torch.autograd.grad(loss_fn(logits, y), x_req)
        if norm == "inf":
            direction = grad.sign()
        else:
            direction = grad / (l2_norms(grad) + L2_GRAD_EPS)
        # delta = x_adv - x; PROTOCOL section 6's "delta *= mask" is the update mask (delta is masked).
        delta = (x_adv - x).addcmul_(direction, update_mask, value=step)
        stepped = (x + project_onto_ball(delta, eps, norm)).clamp_(-1, 1)
        # torch.where keeps frozen samples bit-identical to the input that fooled the model.
        x_adv = stepped if active is None else torch.where(per_sample(active), stepped, x_adv)

    if active is not None and check_last:
        with torch.no_grad():
            active = active & (model(x_adv, mask).argmax(dim=1) == y)
    return x_adv, active


def pgd_attack(model: Model, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
               eps: float, norm: str | int | float = "inf", steps: int = 100,
               step_size: float | None = None, random_start: bool = True, restarts: int = 2,
               early_stop: bool = True, loss_fn: LossFn = ce_loss,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Projected gradient descent within an L-inf or L2 ball of radius ``eps`` (PROTOCOL section 6).

    Each iteration: g = d loss_fn(model(x_adv, mask), y) / d x_adv, normalized per sample
    (sign for L-inf, g / (||g||_2 + 1e-12) for L2); delta += step_size * g; delta *= mask;
    project delta onto the ball; x_adv = clip(x + delta, -1, 1); delta = x_adv - x.
    The random start is U(-eps, eps) per element (L-inf) or eps * U(-1, 1) per element
    scaled down to norm eps if longer (L2), times the mask.

    With ``early_stop`` (evaluation): samples misclassified on the clean input are returned
    unchanged; a sample misclassified at some iterate is frozen at that iterate; with
    ``restarts`` > 1 the samples not yet broken are attacked again from a fresh random start
    and a sample broken by any start is returned at its breaking input (samples never broken
    at the last start's final iterate). Restarts only apply with early stop and a random
    start: without early stop (adversarial training) every sample runs every iteration from
    one start, and without a random start further starts would repeat the first.

    Args:
        model: called as model(x, mask) -> logits (B, classes); its mode is left unchanged.
        x: (B, leads, T) inputs in [-1, 1]; y: (B,) labels; mask: (B, 1, T).
        eps: budget >= 0 (0 returns a copy of x). norm: "inf"/"linf"/inf or 2/"2"/"l2".
        steps: iterations >= 0. step_size: None means eps / 10.
        loss_fn: loss(logits, y) to ascend, summed over samples (ce_loss, soft_margin_loss).
        generator: torch.Generator on x's device for the random starts (None: global RNG).

    Returns:
        x_adv, detached, with x's shape and dtype.
    """
    norm = parse_norm(norm)
    eps = check_eps(eps)
    if steps < 0 or restarts < 1:
        raise ValueError(f"steps must be >= 0 and restarts >= 1, got steps={steps}, "
                         f"restarts={restarts}")
    step = eps / 10 if step_size is None else check_eps(step_size, "step_size")
    x, mask = check_inputs(x, y, mask)
    if eps == 0:
        return x.clone()

    settings = dict(eps=eps, norm=norm, step=step, steps=steps, random_start=random_start,
                    loss_fn=loss_fn, generator=generator)
    if not early_stop:
        x_adv, _ = _run_start(model, x, y, mask, x, None, check_last=False, **settings)
        return x_adv.detach()

    with torch.no_grad():
        active = model(x, mask).argmax(dim=1) == y  # clean-wrong samples are not attacked
    x_adv = x.clone()
    starts = restarts if random_start else 1
    for start in range(starts):
        if not bool(active.any()):
            break
        x_adv, active = _run_start(model, x, y, mask, x_adv, active,
                                   check_last=start < starts - 1, **settings)
    return x_adv.detach()


def ifgsm_attack(model: Model, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                 eps: float, norm: str | int | float = "inf", steps: int = 100,
                 step_size: float | None = None, restarts: int = 2, early_stop: bool = True,
                 loss_fn: LossFn = ce_loss, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
    """Iterative FGSM: ``pgd_attack`` starting from the clean input (no random start).

    Being deterministic from a fixed start, it runs a single start whatever ``restarts``
    says; the argument exists so that both attacks share one signature.
    """
    return pgd_attack(model, x, y, mask, eps, norm=norm, steps=steps, step_size=step_size,
                      random_start=False, restarts=restarts, early_stop=early_stop,
                      loss_fn=loss_fn, generator=generator)
