"""Loss pieces of the three defenses (PROTOCOL section 5) and of the baselines beyond the paper
(TRADES, fast adversarial training; PROTOCOL section 10), for any model called as ``model(x, mask)``.

Inputs follow the project's batch convention: x (B, leads, T), y (B,) int64 labels, mask
(B, 1, T) with 1 on signal samples and 0 on padding; logits are (B, classes).

- NSR: ``mse_onehot_loss`` (loss1), ``multi_margin_loss`` (loss2), ``nsr_loss`` (loss3).
- Jacobian: ``jacobian_loss`` (loss2), exact or by random projections (Hoffman et al. 2019).
- Adversarial training: ``adversarial_eps`` and ``adversarial_step`` (the budget schedule),
  ``adversarial_loss`` (CE on PGD inputs) and ``mixed_adversarial_loss`` (the paper's mix of
  the clean and adversarial terms; advls with PGD-20, fast_adv with one FGSM step).
- TRADES: ``trades_kl`` and ``trades_attack``.

The input-gradient terms need a model without cross-sample interaction (each sample's logits
depend on its own input only), which GroupNorm and the CNN of ECG_CNN.py guarantee (no
BatchNorm): then the gradient of a sum over samples w.r.t. the batch holds every sample's own
gradient, and one backward pass serves the whole batch.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

import attacks
from plumbing.distributed import union_sum, unwrap

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

NSR_SIGNAL_OFFSET = 0.01  # keeps NSR = noise / (signal + 0.01) finite for a clipped logit


# ----------------------------------------------------------------------------- NSR

def mse_onehot_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of sum_k (z_k - onehot(y)_k)^2 (NSR loss1)."""
    onehot = F.one_hot(y, logits.shape[1]).to(logits.dtype)
    return (logits - onehot).pow(2).sum(dim=1).mean()


def _no_reduction(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def multi_margin_loss(logits: torch.Tensor, y: torch.Tensor,
                      reduce: Callable[[torch.Tensor], torch.Tensor] = _no_reduction) -> torch.Tensor:
    """NSR loss2 over the given (correctly classified) samples.

    For each sample and class j != y: d = 1 - z_y + z_j; the terms with 0 < d < 2 are kept;
    the result is their mean when more than one is kept, else their sum (0 when none).
    Computed without a host sync. ``reduce`` combines the sum and the count across
    processes before dividing (distributed.union_sum under torchrun).
    """
    own = logits.gather(1, y[:, None])
    margins = 1 - own + logits
    kept = (margins > 0) & (margins < 2) & ~F.one_hot(y, logits.shape[1]).bool()
    total = torch.where(kept, margins, torch.zeros_like(margins)).sum()
    # "Mean if more than one term, else the sum" is sum / max(count, 1): one term is its own
    # mean and no term sums to 0.
    return reduce(total) / reduce(kept.sum()).clamp(min=1)


def nsr_loss(model: Model, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """NSR loss3 summed over the given samples (the caller divides by their number n).

    s_i = ReLU(z_{i, y_i}) on a fresh forward pass of x (detached); g_i = ds_i/dx_i with
    create_graph=True, so the result is differentiable w.r.t. the weights; Noise_i =
    sum |g_i| over leads and times; returns sum_i log(1 + Noise_i / (s_i + 0.01)).

    The reference code loops over the classes present, running the model on each class's
    samples; one pass over all samples gives the same values because a sample's logits
    depend only on its own input (GroupNorm normalizes per sample), so the gradient of
    sum_i s_i w.r.t. x_i is ds_i/dx_i.
    """
    if x.shape[0] == 0:
        return x.new_zeros(())
    inputs = x.detach().requires_grad_(True)
    logits = model(inputs, mask)
    signal = F.relu(logits.gather(1, y[:, None]).squeeze(1))
    (grad,) = torch.autograd.grad(signal.sum(), inputs, create_graph=True)
    noise = grad.abs().flatten(1).sum(dim=1)
    return torch.log1p(noise / (signal + NSR_SIGNAL_OFFSET)).sum()


# ----------------------------------------------------------------------------- Jacobian

def _jacobian_squared_norm(model: Model, x: torch.Tensor, mask: torch.Tensor, projections: int,
                           generator: torch.Generator | None) -> tuple[torch.Tensor, int]:
    """``jacobian_squared_norm`` and the number of logits C."""
    if projections < 0:
        raise ValueError(f"projections must be >= 0 (0 = exact), got {projections}")
    inputs = x.detach().requires_grad_(True)
    logits = model(inputs, mask)
    batch, classes = logits.shape
    if projections == 0:
        cotangents = torch.eye(classes, dtype=logits.dtype, device=logits.device)
        cotangents = cotangents[:, None, :].expand(classes, batch, classes)
        scale = 1.0
    else:
        directions = torch.randn(projections, batch, classes, generator=generator,
                                 dtype=logits.dtype, device=logits.device)
        cotangents = directions / torch.linalg.vector_norm(directions, dim=2, keepdim=True)
        scale = classes / projections
    # One backward pass per cotangent row (v^T J for every sample at once), all sharing the
    # forward pass; create_graph keeps each differentiable w.r.t. the weights.
    squared = sum(torch.autograd.grad(logits, inputs, cotangent, create_graph=True)[0].pow(2).sum()
                  for cotangent in cotangents)
    return scale * squared, classes


def jacobian_squared_norm(model: Model, x: torch.Tensor, mask: torch.Tensor,
                          projections: int = 0, generator: torch.Generator | None = None
                          ) -> torch.Tensor:
    """sum_i ||dz(x_i)/dx_i||_F^2 over the batch on a fresh forward pass, differentiable
    w.r.t. the weights.

    projections=0: exact, from the C vector-Jacobian products e_m^T J (m = 1..C).
    projections=K>0: Hoffman et al. (2019)'s unbiased estimate C/K * sum_k ||v_k^T J_i||^2
    with v_k uniform on the unit sphere of R^C (E[v v^T] = I / C), drawn independently per
    projection and sample.

    The products are a loop of autograd.grad calls over one forward pass: the batched
    alternatives were not faster on the CPU (benchmarks/README.md, "Jacobian products").

    Args:
        generator: torch.Generator on x's device for the projections (None: global RNG).
    """
    return _jacobian_squared_norm(model, x, mask, projections, generator)[0]


def jacobian_loss(model: Model, x: torch.Tensor, mask: torch.Tensor, projections: int = 0,
                  generator: torch.Generator | None = None,
                  reduce: Callable[[torch.Tensor], torch.Tensor] = _no_reduction) -> torch.Tensor:
    """Jacobian loss2: sqrt(sum_{m, i} ||dz_m(x_i)/dx_i||_2^2) / (B * C), on a fresh forward pass.

    C is the number of logits (9). projections=K>0 replaces the exact squared Frobenius norm
    by its unbiased K-projection estimate (see ``jacobian_squared_norm``). ``reduce``
    combines the squared norm and B across processes (distributed.union_sum under torchrun).
    """
    squared_norm, classes = _jacobian_squared_norm(model, x, mask, projections, generator)
    batch = reduce(torch.tensor(x.shape[0], dtype=squared_norm.dtype, device=squared_norm.device))
    return reduce(squared_norm).sqrt() / (batch * classes)


# ----------------------------------------------------------------------------- adversarial

def adversarial_eps(epoch: int, eps: float, start_epoch: int = 10, epochs: int = 70) -> float:
    """PGD budget at ``epoch`` (numbered from 0): 0 before ``start_epoch``, then linear.

    eps_t = eps * (epoch - start_epoch + 1) / (epochs - start_epoch), reaching eps at the
    last epoch (epochs - 1); with the defaults eps * (epoch - 9) / 60. Epochs past the
    schedule keep eps.
    """
    if epoch < start_epoch:
        return 0.0
    if epochs <= start_epoch:
        raise ValueError(f"epochs ({epochs}) must exceed the adversarial start epoch "
                         f"({start_epoch}) to schedule the budget")
    return eps * min(epoch - start_epoch + 1, epochs - start_epoch) / (epochs - start_epoch)


def adversarial_step(eps_t: float, alpha: float = 4.0, steps: int = 20) -> float:
    """PGD step size alpha * eps_t / steps."""
    return alpha * eps_t / steps


def adversarial_loss(model: Model, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                     eps_t: float, step_size: float, steps: int = 20,
                     label_smoothing: float = 0.0, generator: torch.Generator | None = None,
                     attack_loss: attacks.LossFn = attacks.soft_margin_loss) -> torch.Tensor:
    """Sum over samples of CE(model(X_adv, mask), y), X_adv from L-inf PGD at budget eps_t.

    PGD as adversarial training runs it: random start, one start, no early stop, ``steps``
    iterations of ``step_size`` ascending ``attack_loss`` (the soft logit margin loss by
    default), the model left in its current (training) mode. With steps=1 and a step of
    1.25 eps_t on the CE loss this is Wong et al.'s FGSM with a random start. The caller
    passes the correctly classified samples and divides by the whole batch size.
    """
    if x.shape[0] == 0:
        return x.new_zeros(())
    x_adv = attacks.pgd_attack(model, x, y, mask, eps_t, norm="inf", steps=steps,
                               step_size=step_size, random_start=True, restarts=1,
                               early_stop=False, loss_fn=attack_loss, generator=generator)
    return F.cross_entropy(model(x_adv, mask), y, reduction="sum",
                           label_smoothing=label_smoothing)


def mixed_adversarial_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                           eps_t: float, beta: float, step_size: float, steps: int,
                           attack_loss: attacks.LossFn = attacks.soft_margin_loss, label_smoothing: float = 0.0
                           ) -> tuple[torch.Tensor, dict]:
    """The paper's adversarial training loss at budget eps_t, and its logged parts:
    (1 - beta) * CE(clean) + beta * sum CE(adversarial) / B, the adversarial inputs from
    ``adversarial_loss`` for the correctly classified samples only.

    The loss keeps its weights in every batch (the original's): the adversarial term is 0
    when eps_t is 0 and when no sample is correct. Whether to attack is decided over the whole
    batch (all processes under torchrun); the attack and the adversarial pass run on the plain
    module (see unwrap).
    """
    logits = model(x, mask)
    loss1 = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    correct = logits.argmax(dim=1) == y
    if eps_t == 0 or not union_sum(correct.sum()):
        return (1 - beta) * loss1, {"loss_ce": loss1.detach(), "loss_adv": 0.0}
    loss2 = adversarial_loss(unwrap(model), x[correct], y[correct], mask[correct], eps_t, step_size, steps=steps,
                             label_smoothing=label_smoothing, attack_loss=attack_loss) / len(y)
    loss = (1 - beta) * loss1 + beta * loss2
    return loss, {"loss_ce": loss1.detach(), "loss_adv": loss2.detach(), "eps_t": eps_t}


# ----------------------------------------------------------------------------- TRADES

TRADES_START_SD = 0.001  # the published start x + 0.001 N(0, 1): at x' = x the KL's gradient is 0


def trades_kl(clean_logits: torch.Tensor, adversarial_logits: torch.Tensor) -> torch.Tensor:
    """sum_i KL(softmax(clean_i) || softmax(adversarial_i)), summed over the batch: the reference
    code's KLDivLoss(size_average=False); the caller divides by the batch size ("batchmean")."""
    return F.kl_div(F.log_softmax(adversarial_logits, dim=1), F.log_softmax(clean_logits, dim=1),
                    reduction="sum", log_target=True)


def trades_attack(model: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor, eps: float, step_size: float,
                  steps: int = 10, generator: torch.Generator | None = None) -> torch.Tensor:
    """TRADES' adversarial input (Zhang et al. 2019): L-inf PGD ascending trades_kl(model(x),
    model(x')) from x' = x + 0.001 N(0, 1), ``steps`` sign steps of ``step_size``, each projected
    onto the eps ball around x and clipped to [-1, 1]; noise and steps on the signal only (the
    mask). The model runs in eval mode during the attack, as in the reference code, and its mode
    is restored after. Returns x' detached."""
    x = x.detach()
    mask = attacks.check_batch(x, mask)
    eps = attacks.check_eps(eps)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            clean_logits = model(x, mask)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_adv = x + TRADES_START_SD * noise * mask
        for _ in range(steps):
            x_req = x_adv.detach().requires_grad_(True)
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(trades_kl(clean_logits, model(x_req, mask)), x_req)
            delta = (x_adv - x).addcmul_(grad.sign(), mask, value=step_size)
            x_adv = (x + attacks.project_onto_ball(delta, eps, "inf")).clamp_(-1, 1)
    finally:
        model.train(was_training)
    return x_adv.detach()
