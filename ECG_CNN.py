"""The paper's 1D CNN for variable-length 12-lead ECG (PROTOCOL section 4).

Every model is called as ``model(x, mask)`` with x of shape (B, leads, T) and mask of
shape (B, 1, T) (1 on signal samples, 0 on padding) and returns logits of shape
(B, num_classes). T must be a multiple of 1024 and at least 3072: the trunk divides
the length by 1024 and the final valid convolution removes two positions.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from databases.cpsc2018 import CLASSES, LEADS
from plumbing import pretrained

DOWNSAMPLE = 1024  # stem (4) x eight stride-2 blocks (256)
POOL_KERNEL = 3 * DOWNSAMPLE  # the receptive field of one position of the last conv
MIN_LENGTH = POOL_KERNEL


def check_length(length: int) -> None:
    """Raise ValueError unless ``length`` is a valid input length T for the CNN."""
    if length < MIN_LENGTH or length % DOWNSAMPLE:
        raise ValueError(
            f"input length {length} is not supported: it must be a multiple of "
            f"{DOWNSAMPLE} and at least {MIN_LENGTH}")


def masked_average_pool(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average the positions whose receptive field is mostly signal (PROTOCOL section 4).

    features: (B, C, P); mask: (B, 1, T) with P = (T - 3072) / 1024 + 1. Returns (B, C).
    """
    weight = F.avg_pool1d(mask, POOL_KERNEL, DOWNSAMPLE)
    weight = weight * (weight >= 0.5)
    return (features * weight).sum(dim=2) / (weight.sum(dim=2) + 1e-8)


# --------------------------------------------------------------------------- variable length
#
# ``resnet18a_vl`` computes resnet18a's layers on the valid (signal) positions only, so that a
# record's logits do not depend on how much zero padding surrounds it. Each layer's output
# carries a validity mask of its own resolution:
#
# - A stride-2 layer's output position j covers the input cell [2j, 2j + 2); it is valid when
#   that cell holds a valid input position (the mask is max-pooled with kernel 2, stride 2).
#   After the trunk's total stride of 1024, position j is valid when the input samples
#   [1024 j, 1024 (j + 1)) contain signal. A rule that only looks at a position's own cell
#   commutes with shifting the signal by a multiple of 1024 and never marks a position valid
#   that exists in one padding but lies outside the array in another (cells tile the array).
#   Every record longer than 2048 samples keeps at least three valid positions at stride 1024.
# - Invalid positions are held at zero after every layer, which is exactly the zero padding a
#   convolution sees at the array's ends, so a valid position's receptive field reads the same
#   values (signal or zero) whatever the padding. GroupNorm statistics use valid positions
#   only; the stem's max pooling treats invalid positions as -inf, like its own padding.
# - The final convolution has no padding: output p reads positions p, p + 1, p + 2 and is
#   valid only when all three are (the mask is eroded). A looser rule would count an output
#   next to a signal that ends at the array's last position in one padding but not in another.
# - Pooling is a plain mean over the valid final positions. The paper's 3072-window rule is
#   not padding-invariant: a window reaching past the signal's end exists (and may pass the
#   0.5 threshold) only when there is padding to the right. A record with no valid final
#   position (a signal of at most 2048 samples, depending on its alignment) pools to zero.
#
# Consequently the logits of a record are the same (up to rounding) for every zero padding
# that shifts it by a multiple of 1024 samples, and with an all-ones mask the model computes
# resnet18a (up to rounding). The parameters (names and shapes) are those of resnet18a, so checkpoints
# load either way.


def downsample_mask(mask: torch.Tensor) -> torch.Tensor:
    """Validity after a stride-2 layer: output j is valid when its input cell [2j, 2j+2) has a valid position."""
    return F.max_pool1d(mask, 2, 2, ceil_mode=True)


def erode_mask(mask: torch.Tensor) -> torch.Tensor:
    """Validity after the unpadded 3-tap convolution: output p needs inputs p, p+1, p+2 valid."""
    return -F.max_pool1d(-mask, 3, 1)


def _batched_group_norm(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None,
                        bias: torch.Tensor | None, num_groups: int, eps: float,
                        fill: float) -> torch.Tensor:
    """Masked GroupNorm in differentiable operations (autograd differentiates it to any order):
    sums over valid positions are products with the mask; the variance is taken around the
    mean (two passes, as accurate as GroupNorm). _MaskedGroupNormFunction's second order."""
    batch, channels, _ = x.shape
    per_group = channels // num_groups
    valid = mask.to(x.dtype).transpose(1, 2)  # (B, L, 1)
    count = (mask.sum(dim=2, keepdim=True) * per_group).clamp_min(1)  # (B, 1, 1)

    def group_mean(values: torch.Tensor) -> torch.Tensor:
        """Mean over each group's valid positions, repeated per channel: (B, C, 1)."""
        sums = torch.bmm(values, valid).view(batch, num_groups, per_group)
        means = sums.sum(dim=2, keepdim=True) / count
        return means.expand(-1, -1, per_group).reshape(batch, channels, 1)

    centred = x - group_mean(x)
    scale = torch.rsqrt(group_mean(centred.square()) + eps)  # biased variance, as GroupNorm
    if weight is not None:
        out = torch.addcmul(bias[:, None], centred, scale * weight[:, None])
    else:
        out = centred * scale
    return torch.where(mask > 0, out, fill)


class _MaskedGroupNormFunction(torch.autograd.Function):
    """MaskedGroupNorm's computation: x (B, C, L), mask (B, 1, L) of 0/1 -> (B, C, L).

    The whole batch at once, with no loop over samples or intervals and no read of the mask on
    the host: sums over the valid positions are sums over the tensor with the padding multiplied
    by zero. The forward and the first-order backward (closed form) each allocate one tensor, as
    GroupNorm's kernels do, and work in place in it: a new tensor costs more than a pass over
    one (benchmarks/README.md, "resnet18a_vl"). A backward that must itself be differentiable
    (create_graph: the Jacobian and NSR losses) differentiates _batched_group_norm instead, so
    every higher order is autograd's.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None,
                bias: torch.Tensor | None, num_groups: int, eps: float, fill: float) -> torch.Tensor:
        batch, channels, length = x.shape
        per_group = channels // num_groups
        out = x * mask
        mask = mask.to(out.dtype)  # the backward's bmm needs one dtype
        grouped = out.view(batch, num_groups, per_group, length)
        count = mask.sum(dim=2, keepdim=True)[..., None].mul_(per_group).clamp_min_(1)  # (B, 1, 1, 1)
        mean = grouped.sum(dim=(2, 3), keepdim=True) / count  # (B, G, 1, 1)
        grouped.addcmul_(mean, mask[:, None], value=-1)  # centred on the valid positions, 0 elsewhere
        rstd = (torch.linalg.vector_norm(grouped, dim=(2, 3), keepdim=True).square_() / count + eps).rsqrt_()
        ctx.save_for_backward(x, mask, weight, bias, mean, rstd, count)
        ctx.num_groups, ctx.eps, ctx.fill = num_groups, eps, fill
        if weight is None:
            grouped.mul_(rstd)
        else:
            affine = (num_groups, per_group, 1)
            grouped.mul_(rstd * weight.view(affine)).addcmul_(bias.view(affine), mask[:, None])
        return out.masked_fill_(mask == 0, fill) if fill else out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, mask, weight, bias, mean, rstd, count = ctx.saved_tensors
        wanted = (ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[2],
                  bias is not None and ctx.needs_input_grad[3])
        if torch.is_grad_enabled():  # create_graph: this backward must be differentiable
            inputs = [t for t, want in zip((x, weight, bias), wanted) if want]
            out = _batched_group_norm(x, mask, weight, bias, ctx.num_groups, ctx.eps, ctx.fill)
            grads = iter(torch.autograd.grad(out, inputs, grad, create_graph=True))
            grad_x, grad_weight, grad_bias = (next(grads) if want else None for want in wanted)
            return grad_x, None, grad_weight, grad_bias, None, None, None
        batch, channels, _ = x.shape
        grouped = (batch, ctx.num_groups, channels // ctx.num_groups, 1)
        # Per channel, over the valid positions: the sums of grad and of grad * x (bmm with the
        # mask reads without writing), then of grad * normalized.
        grad_sum = torch.bmm(mask, grad.mT).view(grouped)
        product = grad * x
        grad_dot = (torch.bmm(mask, product.mT).view(grouped) - mean * grad_sum) * rstd
        w = 1 if weight is None else weight.view(grouped[1:])
        # grad_x = mask * rstd * (w grad - mean of w grad - normalized * mean of w grad normalized)
        #        = mask * (grad * scale + x * coef_x + shift), means over each group's valid positions
        coef_x = -rstd.square() * (grad_dot * w).sum(dim=2, keepdim=True) / count
        shift = -rstd * (grad_sum * w).sum(dim=2, keepdim=True) / count - coef_x * mean
        scale = rstd * w
        per_channel = (batch, channels, 1)
        grad_x = torch.mul(grad, scale.expand(grouped).reshape(per_channel), out=product)
        grad_x.addcmul_(x, coef_x.expand(grouped).reshape(per_channel))
        grad_x.add_(shift.expand(grouped).reshape(per_channel)).mul_(mask)
        return (grad_x if wanted[0] else None, None, grad_dot.sum(0).flatten() if wanted[1] else None,
                grad_sum.sum(0).flatten() if wanted[2] else None, None, None, None)


class MaskedGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics use only the valid positions; outputs are ``fill`` elsewhere.

    ``forward(x, mask, fill=0.0)`` with x (B, C, L) and mask (B, 1, L) of 0/1. Same parameters
    as nn.GroupNorm; without a mask (None) or with an all-ones mask it computes nn.GroupNorm.
    A sample without any valid position gives ``fill`` everywhere (no division by zero).
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,  # type: ignore[override]
                fill: float = 0.0) -> torch.Tensor:
        if mask is None:
            return super().forward(x)
        return _MaskedGroupNormFunction.apply(x, mask, self.weight, self.bias, self.num_groups, self.eps, fill)


# --------------------------------------------------------------------------- the models
#
# One trunk for every model: resnet18a's layers, run on the whole array (no mask) or on the
# valid positions only (with a mask), so an architecture edit is made once.


class ResidualBlock(nn.Module):
    """Two 3-tap convolutions with GroupNorm; a strided 1x1 convolution on the shortcut.

    ``forward(x, mask=None) -> (out, out_mask)``: without a mask, resnet18a's block; with one,
    the block on the valid positions (MaskedGroupNorm) and the output's validity. The shortcut
    is a ModuleList (conv, norm) because the norm takes the mask.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2):
        super().__init__()
        self.conv1 = nn.Conv1d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.norm1 = MaskedGroupNorm(out_channels, out_channels)
        self.conv2 = nn.Conv1d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.norm2 = MaskedGroupNorm(out_channels, out_channels)
        self.shortcut = nn.ModuleList([
            nn.Conv1d(in_channels, out_channels, 1, stride, bias=False),
            MaskedGroupNorm(out_channels, out_channels)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        mask = None if mask is None else downsample_mask(mask)
        out = F.leaky_relu(self.norm1(self.conv1(x), mask))
        out = self.norm2(self.conv2(out), mask)
        shortcut_conv, shortcut_norm = self.shortcut
        return F.leaky_relu(out + shortcut_norm(shortcut_conv(x), mask)), mask


class Trunk(nn.Module):
    """Stem, eight stride-2 residual blocks and the final valid convolution, shared by every model.

    ``forward(x, mask=None) -> (features, final_mask)``, features (B, 512, T/1024 - 2). Without
    a mask: resnet18a's trunk on the whole array (final_mask None). With one: the same layers on
    the valid positions only; input samples outside the mask are ignored (read as zero) and
    features are zero at invalid final positions.
    """

    CHANNELS = (64, 64, 64, 128, 128, 256, 256, 512, 512)

    def __init__(self, in_leads: int):
        super().__init__()
        # Only the parameterized stem layers are modules (indices 0 and 1: the parameter names of
        # a Sequential(conv, norm, LeakyReLU, MaxPool1d)); the activation and pooling are applied
        # in forward, where they need the mask.
        self.stem = nn.ModuleList([nn.Conv1d(in_leads, 64, 11, 2, 5, bias=False), MaskedGroupNorm(64, 64)])
        self.blocks = nn.ModuleList([
            ResidualBlock(c_in, c_out) for c_in, c_out in zip(self.CHANNELS[:-1], self.CHANNELS[1:])])
        self.head_conv = nn.Conv1d(512, 512, 3, 1, 0, bias=True)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        stem_conv, stem_norm = self.stem
        conv_mask = None if mask is None else downsample_mask(mask)
        # Invalid positions are -inf for the max pooling, like its own padding (leaky ReLU keeps -inf).
        out = stem_norm(stem_conv(x if mask is None else x * mask), conv_mask, float("-inf"))
        out = F.max_pool1d(F.leaky_relu(out), 3, 2, 1)
        if mask is not None:
            mask = downsample_mask(conv_mask)
            out = out.masked_fill(mask == 0, 0.0)  # a valid output's window has a finite value
        for block in self.blocks:
            out, mask = block(out, mask)
        out = F.relu(self.head_conv(out))
        if mask is None:
            return out, None
        mask = erode_mask(mask)
        return out * mask, mask


class ResNet18A(nn.Module):
    """``resnet18a``, the paper's model: masked average pooling, then a linear classifier."""

    def __init__(self, in_leads: int, num_classes: int):
        super().__init__()
        self.trunk = Trunk(in_leads)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(masked_average_pool(self.trunk(x)[0], mask))


class ResNet18M(nn.Module):
    """``resnet18m``: the classifier at every position, then the maximum over positions; no mask."""

    def __init__(self, in_leads: int, num_classes: int):
        super().__init__()
        self.trunk = Trunk(in_leads)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.classifier(self.trunk(x)[0].transpose(1, 2))  # (B, P, classes)
        return logits.max(dim=1).values


def masked_mean_pool(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of features (B, C, P) over the positions where mask (B, 1, P) is 1; zero if none."""
    return (features * mask).sum(dim=2) / mask.sum(dim=2).clamp_min(1)


class ResNet18AVariableLength(nn.Module):
    """``resnet18a_vl``: resnet18a computed on the signal only, independent of the zero padding.

    Same parameters as resnet18a (a checkpoint of one loads into the other). See the notes
    opening the variable-length section (above downsample_mask) for the mask rules and pooling.
    """

    def __init__(self, in_leads: int, num_classes: int):
        super().__init__()
        self.trunk = Trunk(in_leads)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(masked_mean_pool(*self.trunk(x, mask)))


MODELS = {"resnet18a": ResNet18A, "resnet18m": ResNet18M, "resnet18a_vl": ResNet18AVariableLength}


def build_model(name: str = "resnet18a", in_leads: int = len(LEADS),
                num_classes: int = len(CLASSES)) -> nn.Module:
    """Build a model by name (by default for the 8 leads of ``cpsc2018.LEADS`` and the 9 classes);
    raises ValueError naming the known models for an unknown one."""
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}': choose one of {', '.join(MODELS)}")
    return MODELS[name](in_leads=in_leads, num_classes=num_classes)


def from_pretrained(path_or_repo_id: str | Path, cache_dir: str | Path | None = None) -> nn.Module:
    """The model of a model folder (``python export.py``) or of a Hub repository holding one
    (plumbing.pretrained.resolve; ``cache_dir``: the Hub cache), in eval mode; ``model.config`` is
    its config.json: the preprocessing its inputs need and the training settings. Raises
    pretrained.ModelFolderError naming the file that cannot be used."""
    folder = pretrained.resolve(path_or_repo_id, cache_dir)
    config = pretrained.read_config(folder, MODELS)
    try:
        check_length(config["preprocessing"]["input_length"])
    except ValueError as error:
        raise pretrained.ModelFolderError(f"{folder / pretrained.CONFIG_FILE}: preprocessing {error}") from None
    model = build_model(config["architecture"], **config["architecture_args"])
    pretrained.load_weights(model, folder)
    model.config = config
    return model.eval()
