"""Loss pieces of the three defenses (PROTOCOL section 5), for any model called as ``model(x, mask)``.

Inputs follow the project's batch convention: x (B, leads, T), y (B,) int64 labels, mask
(B, 1, T) with 1 on signal samples and 0 on padding; logits are (B, classes).

- NSR: ``mse_onehot_loss`` (loss1), ``multi_margin_loss`` (loss2), ``nsr_loss`` (loss3).
- Jacobian: ``jacobian_loss`` (loss2), exact or by random projections (Hoffman et al. 2019).
- Adversarial training: ``adversarial_eps`` and ``adversarial_step`` (the budget schedule)
  and ``adversarial_loss`` (CE on 20-step PGD inputs).

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
                     label_smoothing: float = 0.0, generator: torch.Generator | None = None
                     ) -> torch.Tensor:
    """Sum over samples of CE(model(X_adv, mask), y), X_adv from L-inf PGD at budget eps_t.

    PGD as adversarial training runs it: random start, one start, no early stop, ``steps``
    iterations of ``step_size`` ascending the soft logit margin loss, the model left in its
    current (training) mode. The caller passes the correctly classified samples and divides
    by the whole batch size.
    """
    if x.shape[0] == 0:
        return x.new_zeros(())
    x_adv = attacks.pgd_attack(model, x, y, mask, eps_t, norm="inf", steps=steps,
                               step_size=step_size, random_start=True, restarts=1,
                               early_stop=False, loss_fn=attacks.soft_margin_loss,
                               generator=generator)
    return F.cross_entropy(model(x_adv, mask), y, reduction="sum",
                           label_smoothing=label_smoothing)
