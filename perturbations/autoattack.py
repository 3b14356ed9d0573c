"""AutoAttack's line-up (Croce and Hein, ICML 2020) without FAB, beyond the paper: Auto-PGD
(untargeted and targeted), the Square attack and their ensemble, which check PGD's numbers for
gradient masking (the ``apgd_ce``, ``apgd_dlr``, ``apgd_t``, ``square``, ``autoattack`` and
``autoattack_fast`` sweeps of ``config.SWEEPS``, at PROTOCOL section 6's L-inf levels, with its
mask and clip; PROTOCOL section 10).

Inputs, randomness and model state as in ``attacks`` (its docstring gives the batch convention).

- ``apgd_attack``: Auto-PGD with the CE, the DLR or the targeted DLR loss (APGD-T), L-inf or
  L2, step size set by the attack itself (no step-size parameter to tune).
- ``square_attack``: the score-based, gradient-free Square attack (Andriushchenko et al.,
  ECCV 2020), L-inf, with time windows in place of squares.
- ``ensemble_attack``: AutoAttack's standard version (APGD-CE, APGD-T, Square-5000) or the
  fast one (APGD-CE, APGD-DLR, Square-1000), each attack on the survivors of the ones before,
  reporting which attack broke each sample first.
- ``model_checks`` / ``check_warnings``: AutoAttack's warnings (randomized model,
  probabilities for logits, zero gradients, Square breaking what the gradients missed).
"""
from __future__ import annotations

import bisect

import torch
import torch.nn.functional as F

from attacks import (L2_GRAD_EPS, LossFn, Model, check_eps, check_inputs, dlr_losses, dlr_targeted_losses, l2_norms,
                     margins, parse_norm, per_sample, project_onto_ball)

# Auto-PGD (Croce and Hein, ICML 2020, section 3): checkpoints p_0 = 0, p_1 = 0.22,
# p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), here in percent so that they are exact.
APGD_FIRST_CHECKPOINT_PERCENT = 22
APGD_WINDOW_SHRINK_PERCENT = 3
APGD_MIN_WINDOW_PERCENT = 6
APGD_INITIAL_STEP = 2.0  # times eps, for L-inf and L2 alike
APGD_MOMENTUM = 0.75
APGD_RHO = 0.75  # a window with fewer loss increases than this fraction halves the step

# Square attack (Andriushchenko et al., ECCV 2020): the fraction p of the signal a window
# covers is p_init until 0.1 % of the queries, then halves at each of these fractions.
SQUARE_HALVING_FRACTIONS = (0.001, 0.005, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8)

# The ensemble's versions: its attacks in the order they run, and Square's queries at 100
# gradient steps. "standard" is AutoAttack's standard version without FAB-T (PROTOCOL section 10
# says why), "fast" the 2020 line-up without FAB that came first here.
ENSEMBLE_VERSIONS = {"standard": ("apgd-ce", "apgd-t", "square"), "fast": ("apgd-ce", "apgd-dlr", "square")}
SQUARE_QUERIES = {"standard": 5000, "fast": 1000}
SQUARE_STARTS = ("lead", "stripes")  # the first, the stronger where measured, is the default (benchmarks/README.md)

# AutoAttack's checks (its flags_doc.md): two forward passes differing by more than this
# (outputs scaled to unit L2 norm) mean a randomized model; outputs within this of [0, 1]
# and of summing to 1 look like probabilities.
RANDOMIZED_TOLERANCE = 1e-4
PROBABILITY_TOLERANCE = 1e-5


def _ce_losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


_PER_SAMPLE_LOSSES = {"ce": _ce_losses, "dlr": dlr_losses, "dlr_targeted": dlr_targeted_losses}


# ----------------------------------------------------------------------------- Auto-PGD

def apgd_checkpoints(steps: int) -> list[int]:
    """The iterations w_j = ceil(p_j * steps) at which Auto-PGD may halve its step size.

    p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) while p_j <= 1
    (Croce and Hein, ICML 2020); checkpoints that coincide for small ``steps`` count once.
    """
    percents = [0, APGD_FIRST_CHECKPOINT_PERCENT]
    while True:
        following = percents[-1] + max(percents[-1] - percents[-2] - APGD_WINDOW_SHRINK_PERCENT,
                                       APGD_MIN_WINDOW_PERCENT)
        if following > 100:
            break
        percents.append(following)
    return sorted({-(-p * steps // 100) for p in percents[1:]})


def _losses_and_gradient(model: Model, x_adv: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                         losses_fn: LossFn, target: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-sample losses, their input gradient, misclassified) at x_adv: one forward and
    backward; ``target`` the target classes of a targeted loss (None: untargeted)."""
    x_req = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x_req, mask)
        losses = losses_fn(logits, y) if target is None else losses_fn(logits, y, target)
        (grad,) = torch.autograd.grad(losses.sum(), x_req)
    return losses.detach(), grad, logits.detach().argmax(dim=1) != y


def _onto_ball(x: torch.Tensor, point: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """``point`` projected onto the eps ball around x, then clipped to [-1, 1]."""
    return (x + project_onto_ball(point - x, eps, norm)).clamp_(-1, 1)


def _apgd_start(x: torch.Tensor, mask: torch.Tensor, eps: float, norm: str,
                generator: torch.Generator | None) -> torch.Tensor:
    """A random point on the eps sphere inside the mask, clipped to [-1, 1] (the reference's
    start: uniform noise scaled to max |delta| = eps for L-inf, Gaussian noise scaled to
    ||delta||_2 = eps for L2)."""
    draw = dict(generator=generator, device=x.device, dtype=x.dtype)
    if norm == "inf":
        noise = (2 * torch.rand(x.shape, **draw) - 1) * mask
        size = noise.abs().amax(dim=(1, 2), keepdim=True)
    else:
        noise = torch.randn(x.shape, **draw) * mask
        size = l2_norms(noise)
    return (x + eps * noise / size.clamp_min(torch.finfo(x.dtype).tiny)).clamp_(-1, 1)


def _apgd_run(model: Model, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, eps: float,
              norm: str, steps: int, losses_fn: LossFn, generator: torch.Generator | None,
              target: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One Auto-PGD run from a random start on clean-correct samples (``target``: each
    sample's target class, for a targeted loss).

    Returns (x_adv, broken): a broken sample at its first misclassified iterate (it is
    attacked no further), the others at their highest-loss iterate.
    """
    x_adv, broken = x.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device)
    rows = torch.arange(len(x), device=x.device)  # the samples still attacked, as rows of x
    start = _apgd_start(x, mask, eps, norm, generator)
    loss, grad, fooled = _losses_and_gradient(model, start, y, mask, losses_fn, target)
    targeted = {} if target is None else {"target": target}
    state = dict(x=x, y=y, mask=mask, **targeted, x_cur=start, x_prev=start, grad=grad, loss=loss,
                 x_best=start, grad_best=grad, loss_best=loss, loss_best_at_check=loss,
                 step=torch.full((len(x), 1, 1), APGD_INITIAL_STEP * eps, dtype=x.dtype,
                                 device=x.device),
                 increases=torch.zeros(len(x), dtype=torch.long, device=x.device),
                 halved_at_check=torch.zeros(len(x), dtype=torch.bool, device=x.device))
    checkpoints, last_checkpoint = set(apgd_checkpoints(steps)), 0
    for i in range(steps + 1):
        if bool(fooled.any()):  # freeze them at this iterate and drop them from the batch
            x_adv[rows[fooled]] = state["x_cur"][fooled]
            broken[rows[fooled]] = True
            rows, state = rows[~fooled], {k: v[~fooled] for k, v in state.items()}
            if not len(rows):
                return x_adv, broken
        if i == steps:
            break
        s = state
        if i > 0 and i in checkpoints:
            # Halve the step where the last window rarely raised the loss (condition 1) or
            # neither the step nor the best loss changed since the previous checkpoint
            # (condition 2); those samples go on from their best point.
            halve = ((s["increases"] < APGD_RHO * (i - last_checkpoint))
                     | (~s["halved_at_check"] & (s["loss_best"] <= s["loss_best_at_check"])))
            back = per_sample(halve)
            s["step"] = torch.where(back, s["step"] / 2, s["step"])
            s["x_cur"] = torch.where(back, s["x_best"], s["x_cur"])
            s["grad"] = torch.where(back, s["grad_best"], s["grad"])
            s["loss"] = torch.where(halve, s["loss_best"], s["loss"])
            s["halved_at_check"], s["loss_best_at_check"] = halve, s["loss_best"]
            s["increases"] = torch.zeros_like(s["increases"])
            last_checkpoint = i

        if norm == "inf":
            direction = s["grad"].sign()
        else:  # normalized over the signal only, so that the step is taken where it can act
            masked = s["grad"] * s["mask"]
            direction = masked / (l2_norms(masked) + L2_GRAD_EPS)
        z = _onto_ball(s["x"], s["x_cur"] + s["step"] * direction * s["mask"], eps, norm)
        momentum = APGD_MOMENTUM if i > 0 else 1.0
        x_next = _onto_ball(s["x"], s["x_cur"] + momentum * (z - s["x_cur"])
                            + (1 - momentum) * (s["x_cur"] - s["x_prev"]), eps, norm)
        loss, grad, fooled = _losses_and_gradient(model, x_next, s["y"], s["mask"], losses_fn, s.get("target"))

        s["increases"] = s["increases"] + (loss > s["loss"])
        better = loss > s["loss_best"]
        keep_best = per_sample(better)
        s["x_best"] = torch.where(keep_best, x_next, s["x_best"])
        s["grad_best"] = torch.where(keep_best, grad, s["grad_best"])
        s["loss_best"] = torch.where(better, loss, s["loss_best"])
        s["x_prev"], s["x_cur"], s["grad"], s["loss"] = s["x_cur"], x_next, grad, loss
    x_adv[rows] = state["x_best"]
    return x_adv, broken


def apgd_attack(model: Model, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, eps: float,
                norm: str | int | float = "inf", steps: int = 100, loss: str = "ce",
                restarts: int = 1, generator: torch.Generator | None = None,
                target_classes: int | None = None) -> torch.Tensor:
    """Auto-PGD (Croce and Hein, ICML 2020) within an L-inf or L2 ball of radius ``eps``.

    PGD whose step size needs no tuning: it starts at 2 eps and is halved at the checkpoints
    of ``apgd_checkpoints`` for the samples where the loss rose in fewer than 75 % of the
    window's iterations or where neither step nor best loss changed since the last
    checkpoint; such samples restart from their highest-loss point. Each step is
    z = P(x_k + step * normalized gradient), x_{k+1} = P(x_k + 0.75 (z - x_k) + 0.25 (x_k - x_{k-1}))
    (momentum; the first step is plain), P the projection onto the ball and into [-1, 1].
    Perturbations stay inside the mask (PROTOCOL section 6): the gradient is masked, and
    for L2 it is normalized and the ball measured over the signal only.

    Samples misclassified on the clean input are returned unchanged (they count as broken);
    a sample misclassified at an iterate is returned at that iterate and attacked no further
    (so a batch shrinks as samples break). ``restarts`` further random starts attack the
    samples no start has broken yet; survivors are returned at their highest-loss point.

    APGD-T (``loss="dlr_targeted"``, AutoAttack's targeted version): the targeted DLR loss
    (``attacks.dlr_targeted_losses``) for each of the sample's ``target_classes`` highest-scoring
    other classes on the clean input in turn (the second-highest logit first), each target
    with ``restarts`` runs and the full step-size schedule; a sample counts as broken when it
    is misclassified (as any class) and is not attacked for the later targets. Survivors come
    back at the last target's highest-loss point.

    Args:
        model: called as model(x, mask) -> logits (B, classes); its mode is left unchanged.
        x: (B, leads, T) inputs in [-1, 1]; y: (B,) labels; mask: (B, 1, T).
        eps: budget >= 0 (0 returns a copy of x). norm: "inf"/"linf"/inf or 2/"2"/"l2".
        steps: iterations >= 0 per start (one forward and backward each, plus one at the start).
        loss: "ce" (cross-entropy), "dlr" (``dlr_losses``, needs at least 3 classes) or
            "dlr_targeted" (APGD-T, needs at least 4 classes).
        generator: torch.Generator on x's device for the random starts (None: global RNG).
        target_classes: APGD-T's targets per sample, 1 to classes - 1 (None: classes - 1, as
            AutoAttack's standard version: 9 of 10 classes); only with "dlr_targeted".

    Returns:
        x_adv, detached, with x's shape, dtype and device.
    """
    norm = parse_norm(norm)
    eps = check_eps(eps)
    if loss not in _PER_SAMPLE_LOSSES:
        raise ValueError(f"loss {loss!r} is not supported: use one of {sorted(_PER_SAMPLE_LOSSES)}")
    if steps < 0 or restarts < 1:
        raise ValueError(f"steps must be >= 0 and restarts >= 1, got steps={steps}, "
                         f"restarts={restarts}")
    x, mask = check_inputs(x, y, mask)
    if eps == 0:
        return x.clone()
    with torch.no_grad():
        logits = model(x, mask)
    classes = logits.shape[1]
    least_classes = {"dlr": 3, "dlr_targeted": 4}.get(loss, 2)
    if classes < least_classes:
        raise ValueError(f"the {loss} loss needs at least {least_classes} classes, the model has {classes}")
    if target_classes is not None and (loss != "dlr_targeted" or not 1 <= target_classes < classes):
        raise ValueError(f"target_classes must be 1 to {classes - 1} and only with loss='dlr_targeted', "
                         f"got {target_classes} with loss={loss!r}")
    # Untargeted: one pass with no target; APGD-T: the k-th highest other logit, k = 1, 2, ...
    ranked = logits.argsort(dim=1, descending=True)
    targets = [None] if loss != "dlr_targeted" else \
        [ranked[:, k] for k in range(1, 1 + (target_classes or classes - 1))]
    unbroken = logits.argmax(dim=1) == y
    x_adv = x.clone()
    for target in targets:
        for _ in range(restarts):
            rows = unbroken.nonzero().squeeze(1)
            if not len(rows):
                return x_adv
            x_run, broken = _apgd_run(model, x[rows], y[rows], mask[rows], eps, norm, steps,
                                      _PER_SAMPLE_LOSSES[loss], generator,
                                      None if target is None else target[rows])
            x_adv[rows] = x_run
            unbroken[rows[broken]] = False
    return x_adv


# ----------------------------------------------------------------------------- Square

def square_fraction(p_init: float, query: int, queries: int) -> float:
    """The fraction of each signal one window covers at ``query`` (0-based) of ``queries``:
    p_init, halved each time query / queries passes one of SQUARE_HALVING_FRACTIONS (the
    published schedule, rescaled from 10,000 queries to ``queries``)."""
    return p_init / 2 ** bisect.bisect_left(SQUARE_HALVING_FRACTIONS, query / queries)


def _random_signs(shape: tuple[int, ...], like: torch.Tensor,
                  generator: torch.Generator | None) -> torch.Tensor:
    """Independent +-1 draws in like's dtype and device."""
    draw = torch.randint(0, 2, shape, generator=generator, device=like.device)
    return (2 * draw - 1).to(like.dtype)


def _signal_spans(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first index, length) per sample of the span from its first to its last mask = 1."""
    on = mask[:, 0] > 0
    positions = torch.arange(on.shape[1], device=mask.device)
    first = torch.where(on, positions, on.shape[1]).amin(dim=1)
    last = torch.where(on, positions, -1).amax(dim=1)
    return first, (last - first + 1).clamp_min(0)


def square_attack(model: Model, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, eps: float,
                  norm: str | int | float = "inf", queries: int = 1000, p_init: float = 0.8,
                  generator: torch.Generator | None = None, start: str = SQUARE_STARTS[0]) -> torch.Tensor:
    """Square attack (Andriushchenko et al., ECCV 2020), L-inf, on signals with a mask.

    A random search that only reads the model's logits (no gradients; it runs under
    ``torch.no_grad()``), so gradient masking does not stop it. It lowers the margin
    z_y - max_{i != y} z_i: a candidate that lowers a sample's margin replaces its current point.

    1D adaptation: an image square spans every colour channel with one random sign per
    channel; here a window is a run of time samples spanning **all leads, with one random
    +-eps sign per lead**. Its length is round(p * L), at least 1, where L is the length of
    the sample's signal (first to last mask = 1) and p follows ``square_fraction``; it is
    drawn uniformly inside that span, and its padding samples (mask 0) are left alone.

    Start (``start``): "lead" (the default) is one +-eps per lead, constant over the signal
    (the stripe's constant axis taken as the time axis). "stripes" is the published start,
    vertical stripes of +-eps (one random sign per image column and channel, constant along
    the height): with the leads as channels and the signal as one row of columns, one random
    +-eps per lead and time sample, high-frequency along time. Both only on the signal; as in the
    reference, the start is kept whatever its margin. Inside a window the perturbation is
    set to the new +-eps (then clipped to [-1, 1]), so every point stays at the corners of
    the L-inf ball.

    Query count: one forward of the clean batch (not counted, as in the reference), then
    ``queries`` forwards, the first at the start; each forward runs only the samples not
    yet misclassified, and a sample stops at its first misclassified point. Samples
    misclassified on the clean input are returned unchanged.

    Args:
        norm: only L-inf ("inf"); the L2 variant is not implemented.
        queries: forwards per sample at most (>= 1). p_init: the starting fraction in (0, 1].
        start: one of SQUARE_STARTS (above).
        Others as in ``apgd_attack``.

    Returns:
        x_adv with x's shape, dtype and device.
    """
    if parse_norm(norm) != "inf":
        raise ValueError("square_attack: only the L-inf version is implemented")
    eps = check_eps(eps)
    if queries < 1 or not 0 < p_init <= 1:
        raise ValueError(f"queries must be >= 1 and p_init in (0, 1], got queries={queries}, "
                         f"p_init={p_init}")
    if start not in SQUARE_STARTS:
        raise ValueError(f"start {start!r} is not one of {SQUARE_STARTS}")
    x, mask = check_inputs(x, y, mask)
    x_adv = x.clone()
    if eps == 0:
        return x_adv
    with torch.no_grad():
        rows = (model(x, mask).argmax(dim=1) == y).nonzero().squeeze(1)
        if not len(rows):
            return x_adv
        x, y, mask = x[rows], y[rows], mask[rows]
        sign_shape = (len(x), x.shape[1], x.shape[2] if start == "stripes" else 1)
        best = (x + eps * _random_signs(sign_shape, x, generator) * mask).clamp_(-1, 1)
        best_margin = margins(model(best, mask), y)
        first, length = _signal_spans(mask)
        positions = torch.arange(x.shape[2], device=x.device)
        alive = (best_margin > 0).nonzero().squeeze(1)  # rows of x still classified correctly
        for query in range(1, queries):
            if not len(alive):
                break
            span = length[alive]
            width = (square_fraction(p_init, query, queries) * span).round().long().clamp_min(1)
            offset = torch.rand(len(alive), generator=generator, device=x.device,
                                dtype=torch.float64) * (span - width + 1).clamp_min(1)
            start = first[alive] + offset.floor().long()
            window = ((positions >= start[:, None]) & (positions < (start + width)[:, None]))[:, None]
            window = window & (mask[alive] > 0)
            signs = _random_signs((len(alive), x.shape[1], 1), x, generator)
            candidate = torch.where(window, (x[alive] + eps * signs).clamp_(-1, 1), best[alive])
            margin = margins(model(candidate, mask[alive]), y[alive])
            better = margin < best_margin[alive]
            best[alive[better]] = candidate[better]
            best_margin[alive[better]] = margin[better]
            alive = alive[best_margin[alive] > 0]
        x_adv[rows] = best
    return x_adv


# ----------------------------------------------------------------------------- ensemble

def ensemble_attack(model: Model, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                    eps: float, norm: str | int | float = "inf", version: str = "standard",
                    steps: int = 100, queries: int | None = None, restarts: int = 1,
                    target_classes: int | None = None, generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, list[str]]:
    """AutoAttack's recipe (Croce and Hein, ICML 2020) without FAB: each attack of
    ENSEMBLE_VERSIONS[version] in turn on the samples the earlier ones did not break.

    "standard" (AutoAttack's standard version but FAB-T): APGD-CE, APGD-T (``target_classes``
    targets, default classes - 1; needs at least 4 classes), Square with 5000 queries.
    "fast": APGD-CE, APGD-DLR, Square with 1000 queries. For L2 only the APGD attacks run
    (Square is L-inf here). A sample counts as broken by an attack when the model
    misclassifies the attack's output (one forward per attack on the samples it attacked).

    Args:
        steps, restarts: of each APGD run (APGD-T: per target).
        queries: Square's budget (None: SQUARE_QUERIES[version]).
        Others as in ``apgd_attack``.

    Returns:
        (x_adv, broken_by): x_adv as in ``apgd_attack`` (a broken sample at the input that
        broke it, a survivor at the last attack's point); broken_by[i] is "clean" for a
        sample misclassified on the clean input, else the first attack of the version that
        broke it ("apgd-ce", "apgd-t", "apgd-dlr", "square"), else "" (it survived them all).
    """
    if version not in ENSEMBLE_VERSIONS:
        raise ValueError(f"version {version!r} is not one of {sorted(ENSEMBLE_VERSIONS)}")
    norm = parse_norm(norm)
    x, mask = check_inputs(x, y, mask)
    queries = SQUARE_QUERIES[version] if queries is None else queries

    def apgd(loss: str, targets: int | None = None):
        return lambda xs, ys, ms: apgd_attack(model, xs, ys, ms, eps, norm, steps, loss, restarts, generator,
                                              targets)

    runs = {"apgd-ce": apgd("ce"), "apgd-t": apgd("dlr_targeted", target_classes), "apgd-dlr": apgd("dlr"),
            "square": lambda xs, ys, ms: square_attack(model, xs, ys, ms, eps, norm, queries, generator=generator)}
    chosen = [name for name in ENSEMBLE_VERSIONS[version] if norm == "inf" or name != "square"]
    with torch.no_grad():
        clean_wrong = (model(x, mask).argmax(dim=1) != y).tolist()
    broken_by = ["clean" if wrong else "" for wrong in clean_wrong]
    x_adv = x.clone()
    for name in chosen:
        rows = torch.tensor([i for i, by in enumerate(broken_by) if not by], dtype=torch.long,
                            device=x.device)
        if not len(rows):
            break
        x_run = runs[name](x[rows], y[rows], mask[rows])
        with torch.no_grad():
            fooled = (model(x_run, mask[rows]).argmax(dim=1) != y[rows]).tolist()
        x_adv[rows] = x_run
        for row, was_fooled in zip(rows.tolist(), fooled):
            if was_fooled:
                broken_by[row] = name
    return x_adv, broken_by


# ----------------------------------------------------------------------------- AutoAttack's checks

def model_checks(model: Model, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> dict[str, int]:
    """AutoAttack's checks of a model on one clean batch (its flags_doc.md), as counts:

    - "randomized": 1 when two forward passes on the same input differ (a randomized
      defense: attacks on one draw of the model do not apply, use EOT), else 0;
    - "probabilities": 1 when the outputs look like probabilities (in [0, 1], each row
      summing to 1) rather than logits (the losses then saturate), else 0;
    - "zero_gradients": the samples whose cross-entropy input gradient is zero on the whole
      signal (gradient attacks cannot move them);
    - "n": the batch's samples.
    """
    x, mask = check_inputs(x, y, mask)
    with torch.no_grad():
        first, second = model(x, mask), model(x, mask)
    unit = [out / (torch.linalg.vector_norm(out, dim=1, keepdim=True) + 1e-10) for out in (first, second)]
    randomized = bool((unit[0] - unit[1]).norm(dim=1).max() > RANDOMIZED_TOLERANCE) or \
        not torch.equal(first.argmax(dim=1), second.argmax(dim=1))
    probabilities = bool(first.max() < 1 + PROBABILITY_TOLERANCE and first.min() > -PROBABILITY_TOLERANCE
                         and ((first.sum(dim=1) - 1).abs() < PROBABILITY_TOLERANCE).all())
    _, grad, _ = _losses_and_gradient(model, x, y, mask, _ce_losses)
    zero = ((grad * mask).flatten(1).abs().amax(dim=1) == 0).sum()
    return {"randomized": int(randomized), "probabilities": int(probabilities), "zero_gradients": int(zero),
            "n": len(x)}


def check_warnings(checks: dict[str, int], square_breaks: int) -> list[str]:
    """AutoAttack's warnings in plain words, from ``model_checks``' counts summed over the
    batches and the samples Square broke after the white-box attacks had missed them."""
    warnings = []
    if checks.get("randomized"):
        warnings.append("Two forward passes on the same input gave different outputs: the model is "
                        "randomized, attacks on one draw of it do not measure its robustness; use an "
                        "attack with expectation over transformation (EOT).")
    if checks.get("probabilities"):
        warnings.append("The model's outputs look like probabilities (in [0, 1], summing to 1), not "
                        "logits: the attacks' losses saturate; attack the logits.")
    if checks.get("zero_gradients"):
        warnings.append(f"{checks['zero_gradients']} of {checks['n']} records have an input gradient that is "
                        "zero on the whole signal: gradient attacks cannot move them, their numbers are "
                        "unreliable.")
    if square_breaks:
        warnings.append(f"Square, which uses no gradients, broke {square_breaks} records that the white-box "
                        "attacks missed: a sign of gradient masking; the gradient attacks' numbers overstate "
                        "robustness.")
    return warnings
