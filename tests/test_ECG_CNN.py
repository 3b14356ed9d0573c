"""ECG_CNN.py: resnet18a and resnet18m (sizes, lengths, masked pooling), and resnet18a_vl,
resnet18a on the valid positions only, independent of the zero padding."""
import json

import huggingface_hub
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from databases.cpsc2018 import LEADS
from helpers import hub_cache, logits_of, tampered
from training.losses import jacobian_squared_norm
from plumbing.pretrained import ModelFolderError
from ECG_CNN import (DOWNSAMPLE, MaskedGroupNorm, build_model, from_pretrained, check_length, downsample_mask, erode_mask,
                     masked_average_pool)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_resnet18a_has_the_papers_parameter_count():
    assert parameter_count(build_model("resnet18a")) == 4_994_953


def test_resnet18a_state_dict_keys_stay_those_of_saved_checkpoints():
    """Checkpoints load by these names (strictly): a change to the model definitions keeps them."""
    block = ["conv1.weight", "norm1.weight", "norm1.bias", "conv2.weight", "norm2.weight", "norm2.bias",
             "shortcut.0.weight", "shortcut.1.weight", "shortcut.1.bias"]
    expected = ["trunk.stem.0.weight", "trunk.stem.1.weight", "trunk.stem.1.bias",
                *(f"trunk.blocks.{i}.{name}" for i in range(8) for name in block),
                "trunk.head_conv.weight", "trunk.head_conv.bias", "classifier.weight", "classifier.bias"]
    assert list(build_model("resnet18a").state_dict()) == expected


def test_resnet18m_shares_the_trunk_and_classifier_sizes():
    assert parameter_count(build_model("resnet18m")) == 4_994_953


@pytest.mark.parametrize("name", ["resnet18a", "resnet18m"])
@pytest.mark.parametrize("length", [3072, 5120, 8192])
def test_output_shape_for_several_lengths(name, length):
    model = build_model(name).eval()
    x, mask = torch.randn(2, 8, length), torch.ones(2, 1, length)
    with torch.no_grad():
        assert model(x, mask).shape == (2, 9)


def test_trunk_leaves_31_positions_at_the_paper_length():
    model = build_model("resnet18a")
    with torch.no_grad():
        features, final_mask = model.trunk(torch.zeros(1, 8, 33792))
    assert features.shape == (1, 512, 31) and final_mask is None


@pytest.mark.parametrize("length", [2048, 5000, 33792 + 512])
def test_unsupported_lengths_are_rejected(length):
    with pytest.raises(ValueError, match="multiple of 1024"):
        check_length(length)


def test_unknown_model_name_is_rejected_by_name():
    with pytest.raises(ValueError, match="unknown model 'resnet99'"):
        build_model("resnet99")


def test_masked_average_pool_matches_a_brute_force_computation():
    torch.manual_seed(0)
    length = 8 * DOWNSAMPLE
    positions = length // DOWNSAMPLE - 2
    features = torch.randn(3, 4, positions)
    mask = torch.zeros(3, 1, length)
    mask[0, :, :] = 1
    mask[1, :, length - 3500:] = 1   # right-aligned signal of 3500 samples
    mask[2, :, 100:1500] = 1         # 1400 samples: under half of every window
    pooled = masked_average_pool(features, mask)
    for b in range(3):
        weights = []
        for p in range(positions):
            w = mask[b, 0, p * DOWNSAMPLE:p * DOWNSAMPLE + 3 * DOWNSAMPLE].mean().item()
            weights.append(w if w >= 0.5 else 0.0)
        weights = torch.tensor(weights)
        expected = (features[b] * weights).sum(dim=1) / (weights.sum() + 1e-8)
        torch.testing.assert_close(pooled[b], expected)
    assert torch.count_nonzero(pooled[2]) == 0


def test_resnet18a_ignores_padding_content_only_through_the_pooling_weights():
    """Positions with pooling weight 0 do not reach the logits: changing features there is a no-op."""
    torch.manual_seed(0)
    model = build_model("resnet18a").eval()
    length = 8 * DOWNSAMPLE
    mask = torch.zeros(1, 1, length)
    mask[..., -4 * DOWNSAMPLE:] = 1
    features = torch.randn(1, 512, 6)
    changed = features.clone()
    changed[..., 0] += 100.0  # the first position's window is all padding
    with torch.no_grad():
        a = model.classifier(masked_average_pool(features, mask))
        b = model.classifier(masked_average_pool(changed, mask))
    torch.testing.assert_close(a, b)


# --- resnet18a_vl: resnet18a on the valid positions only -------------------------------------


@pytest.fixture(scope="module")
def models() -> tuple[nn.Module, nn.Module]:
    """A random resnet18a and a resnet18a_vl holding the same weights (eval mode)."""
    torch.manual_seed(0)
    paper = build_model("resnet18a").eval()
    variable = build_model("resnet18a_vl").eval()
    variable.load_state_dict(paper.state_dict())
    return paper, variable


def place(signal: torch.Tensor, length: int, shifts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One row per shift: ``signal`` (leads, t) zero-padded to ``length``, ending ``shift`` samples
    before the right end (shift 0: right-aligned), with its mask."""
    t = signal.shape[1]
    x = torch.zeros(len(shifts), len(LEADS), length, dtype=signal.dtype)
    mask = torch.zeros(len(shifts), 1, length, dtype=signal.dtype)
    for row, shift in enumerate(shifts):
        x[row, :, length - shift - t:length - shift] = signal
        mask[row, :, length - shift - t:length - shift] = 1
    return x, mask


def test_same_parameters_as_resnet18a_and_checkpoints_load_both_ways():
    paper, variable = build_model("resnet18a"), build_model("resnet18a_vl")
    assert parameter_count(variable) == 4_994_953
    paper_state, variable_state = paper.state_dict(), variable.state_dict()
    assert list(variable_state) == list(paper_state)
    assert all(variable_state[k].shape == paper_state[k].shape for k in paper_state)
    variable.load_state_dict(paper_state)  # strict
    paper.load_state_dict(variable.state_dict())


def test_with_an_all_ones_mask_it_computes_resnet18a(models):
    paper, variable = models
    torch.manual_seed(1)
    x, mask = torch.rand(2, len(LEADS), 3 * DOWNSAMPLE) * 2 - 1, torch.ones(2, 1, 3 * DOWNSAMPLE)
    with torch.no_grad():
        torch.testing.assert_close(variable(x, mask), paper(x, mask), rtol=1e-5, atol=1e-5)


def reference_norm(norm: MaskedGroupNorm, x: torch.Tensor, mask: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """An independent computation of MaskedGroupNorm: per sample, F.group_norm of its valid
    positions alone (gathered, any mask), ``fill`` elsewhere; autograd differentiates it."""
    rows = []
    for sample, valid in zip(x, mask[:, 0] > 0):
        row = torch.full_like(sample, fill)
        if valid.any():
            row[:, valid] = F.group_norm(sample[:, valid][None], norm.num_groups, norm.weight, norm.bias,
                                         norm.eps)[0]
        rows.append(row)
    return torch.stack(rows)


def random_norm(num_groups: int, channels: int, dtype=torch.float64, affine: bool = True) -> MaskedGroupNorm:
    torch.manual_seed(2)
    norm = MaskedGroupNorm(num_groups, channels, affine=affine).to(dtype)
    if affine:
        with torch.no_grad():
            norm.weight.uniform_(-2, 2)
            norm.bias.uniform_(-0.5, 0.5)
    return norm


def interval_batch(dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """x (4, 6, 24) and a mask of one interval per sample: inside, the whole row, at the left
    end, and empty."""
    torch.manual_seed(7)
    x = torch.randn(4, 6, 24, dtype=dtype) * 2 + 0.5
    mask = torch.zeros(4, 1, 24, dtype=dtype)
    for row, (start, stop) in enumerate([(5, 19), (0, 24), (0, 7)]):
        mask[row, :, start:stop] = 1
    return x, mask


def small_interval_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """interval_batch's four kinds of interval on x (4, 4, 8): small enough for second-order
    finite differences, whose cost grows with the square of the number of values."""
    torch.manual_seed(7)
    x = torch.randn(4, 4, 8, dtype=torch.float64) * 2 + 0.5
    mask = torch.zeros(4, 1, 8, dtype=torch.float64)
    for row, (start, stop) in enumerate([(2, 6), (0, 8), (0, 3)]):
        mask[row, :, start:stop] = 1
    return x, mask


def outputs_and_gradients(function, norm: MaskedGroupNorm, x: torch.Tensor, mask: torch.Tensor,
                          fill: float) -> list[torch.Tensor]:
    """The output (invalid positions set to 0, as ``fill`` may be infinite) and the gradients of
    a fixed random projection of it with respect to x and the norm's parameters."""
    x = x.clone().requires_grad_(True)
    out = function(x, mask, fill).masked_fill(mask == 0, 0.0)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype)
    return [out, *torch.autograd.grad(out, [x, *norm.parameters()], cotangent)]


@pytest.mark.parametrize("num_groups, fill, affine", [(6, 0.0, True), (3, -3.5, True), (2, float("-inf"), True),
                                                      (3, 0.0, False)])
def test_masked_group_norm_matches_group_norm_of_each_valid_part(num_groups, fill, affine):
    """Outputs, input and parameter gradients against F.group_norm of each sample's valid
    positions alone; invalid positions are ``fill``; an empty sample is ``fill`` everywhere."""
    norm = random_norm(num_groups, 6, affine=affine)
    x, mask = interval_batch()
    out = norm(x, mask, fill)
    assert torch.equal(out.masked_select(mask == 0), torch.full_like(out.masked_select(mask == 0), fill))
    expected = outputs_and_gradients(lambda *a: reference_norm(norm, *a), norm, x, mask, fill)
    for got, want in zip(outputs_and_gradients(norm, norm, x, mask, fill), expected):
        torch.testing.assert_close(got, want)


def test_any_mask_not_only_intervals_and_float32():
    """Holes in the mask (two intervals) and float32 (to float32 rounding)."""
    norm = random_norm(3, 6, torch.float32)
    x, mask = interval_batch(torch.float32)
    mask[1, :, 10:12] = 0
    mask[0, :, 3] = 1
    expected = outputs_and_gradients(lambda *a: reference_norm(norm, *a), norm, x, mask, 0.0)
    for got, want in zip(outputs_and_gradients(norm, norm, x, mask, 0.0), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_an_all_ones_mask_gives_group_norm():
    norm = random_norm(3, 6)
    x, _ = interval_batch()
    torch.testing.assert_close(norm(x, torch.ones(4, 1, 24, dtype=x.dtype)), nn.GroupNorm.forward(norm, x))


@pytest.mark.parametrize("fill", [0.0, -3.5])
def test_masked_group_norm_gradients_match_finite_differences(fill):
    """First and second derivatives (Jacobian regularization differentiates twice) against
    numerical differentiation; groups of two channels."""
    x, mask = small_interval_batch()
    norm = random_norm(2, 4)
    inputs = (x.requires_grad_(True), norm.weight, norm.bias)

    def function(x, weight, bias):
        return torch.func.functional_call(norm, {"weight": weight, "bias": bias}, (x, mask, fill))

    assert torch.autograd.gradcheck(function, inputs)
    assert torch.autograd.gradgradcheck(function, inputs)


@pytest.mark.parametrize("frozen", ["norm parameters", "input"])
def test_second_order_gradients_when_some_inputs_need_no_gradient(frozen):
    """create_graph with frozen norm parameters (input gradients only) or an input that needs
    no gradient (weight gradients only), against the per-sample F.group_norm computation."""
    x, mask = interval_batch()
    norm = random_norm(3, 6)
    results = []
    for function in (norm, lambda *a: reference_norm(norm, *a)):
        if frozen == "norm parameters":
            norm.requires_grad_(False)
            inputs = [x.clone().requires_grad_(True)]
            out = function(torch.sin(inputs[0]), mask)
        else:
            inputs = list(norm.parameters())
            out = function(x, mask)
        first = torch.autograd.grad(out.square().sum(), inputs, create_graph=True)
        second = torch.autograd.grad(sum(g.square().sum() for g in first), inputs)
        results.append([*first, *second])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


def test_the_norm_reads_no_value_on_the_host_and_accepts_an_empty_batch():
    """CUDA's requirement: a fixed number of kernels, no loop over samples or intervals and no
    read of the mask on the host. On the meta device (shapes only) any read of a value raises."""
    x, mask = (t.to("meta") for t in interval_batch(torch.float32))
    norm = MaskedGroupNorm(3, 6).to("meta")
    out = norm(x.requires_grad_(True), mask, float("-inf"))
    assert out.shape == x.shape
    assert torch.autograd.grad(out.sum(), x)[0].shape == x.shape
    x, mask = interval_batch()
    assert random_norm(3, 6)(x[:0], mask[:0]).shape == (0, 6, 24)


def test_final_mask_follows_the_cell_rule():
    """Position j of the stride-1024 map is valid iff input samples [1024 j, 1024 j + 1024) hold
    signal; a final position p needs p, p+1 and p+2 valid. Checked against direct counting."""
    length = 12 * DOWNSAMPLE
    spans = [(0, length), (1500, 5000), (3 * DOWNSAMPLE, 6 * DOWNSAMPLE), (7000, length), (100, 2100)]
    mask = torch.zeros(len(spans), 1, length)
    for row, (start, stop) in enumerate(spans):
        mask[row, :, start:stop] = 1
    coarse = mask
    for _ in range(10):  # stem conv, stem max pool, eight blocks
        coarse = downsample_mask(coarse)
    final = erode_mask(coarse)
    for row, (start, stop) in enumerate(spans):
        cells = [bool(mask[row, 0, j * DOWNSAMPLE:(j + 1) * DOWNSAMPLE].any()) for j in range(12)]
        expected = [float(all(cells[p:p + 3])) for p in range(10)]
        assert final[row, 0].tolist() == expected, (start, stop)


def alone_and_padded_logits(model: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Two records, each alone in the shortest array that holds it, then together in T = 8192 at
    several shifts (multiples of 1024). The 4500-sample one starts off the 1024-sample grid; the
    4096-sample one fills its shortest array (no padding, both ends at the border). Returns the
    logits the padded rows should equal if padding did not matter, and those of the padded rows."""
    torch.manual_seed(3)
    long_record, grid_record = (torch.rand(len(LEADS), t, dtype=dtype) * 2 - 1 for t in (4500, 4096))
    wide = 8 * DOWNSAMPLE
    x_wide, mask_wide = (torch.cat(parts) for parts in zip(
        place(long_record, wide, [0, 3 * DOWNSAMPLE]), place(grid_record, wide, [DOWNSAMPLE])))
    model = model.to(dtype)
    try:
        with torch.no_grad():
            long_alone = model(*place(long_record, 5 * DOWNSAMPLE, [0]))
            grid_alone = model(*place(grid_record, 4 * DOWNSAMPLE, [0]))
            padded = model(x_wide, mask_wide)
    finally:
        model.float()
    return torch.cat([long_alone, long_alone, grid_alone]), padded


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_logits_do_not_depend_on_the_padding(models, dtype, tolerance):
    expected, padded = alone_and_padded_logits(models[1], dtype)
    torch.testing.assert_close(padded, expected, rtol=tolerance, atol=tolerance)


def test_resnet18a_logits_do_depend_on_the_padding(models):
    """The invariance test can fail: the paper's model sees padding through GroupNorm and pooling."""
    expected, padded = alone_and_padded_logits(models[0], torch.float32)
    assert (padded - expected).abs().amax(dim=1).min() > 1e-3


def test_padding_content_and_other_samples_do_not_matter(models):
    _, variable = models
    torch.manual_seed(4)
    x, mask = place(torch.rand(len(LEADS), 3500) * 2 - 1, 5 * DOWNSAMPLE, [0, 700])
    noisy = x + 5 * (1 - mask) * torch.randn_like(x)  # garbage outside the mask
    with torch.no_grad():
        both = variable(noisy, mask)
        alone = variable(x[1:], mask[1:])
    torch.testing.assert_close(both[1:], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both, variable(x, mask), rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_parameter_and_only_the_signal_samples():
    torch.manual_seed(5)
    model = build_model("resnet18a_vl")
    x, mask = place(torch.rand(len(LEADS), 3000) * 2 - 1, 4 * DOWNSAMPLE, [0, 1000])
    x.requires_grad_(True)
    loss = nn.functional.cross_entropy(model(x, mask), torch.tensor([1, 7]))
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name
    assert torch.isfinite(x.grad).all()
    assert torch.equal(x.grad * (1 - mask), torch.zeros_like(x))
    assert (x.grad * mask).abs().sum() > 0


def test_a_record_without_a_valid_final_position_gives_the_bias_and_finite_gradients():
    """1500 samples in 2 cells of 1024: no 3 valid coarse positions, so the pooled features are 0."""
    torch.manual_seed(6)
    model = build_model("resnet18a_vl")
    x, mask = place(torch.rand(len(LEADS), 1500) * 2 - 1, 3 * DOWNSAMPLE, [0])
    x.requires_grad_(True)
    logits = model(x, mask)
    torch.testing.assert_close(logits[0], model.classifier.bias.detach())
    logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert torch.isfinite(x.grad).all()



@pytest.fixture
def per_sample_norms(monkeypatch):
    """A function that runs a callable with every MaskedGroupNorm of a mask computed by
    reference_norm (per sample, F.group_norm of the valid positions)."""
    def run(function):
        with monkeypatch.context() as patch:
            patch.setattr(MaskedGroupNorm, "forward", lambda norm, x, mask=None, fill=0.0: (
                nn.GroupNorm.forward(norm, x) if mask is None else reference_norm(norm, x, mask, fill)))
            return function()
    return run


@pytest.mark.slow  # second derivatives of the whole model in float64, twice
def test_jacobian_regularization_differentiates_twice_as_the_per_sample_norms(per_sample_norms):
    """The Jacobian term and its weight gradients (a backward through a create_graph backward)
    are those of the model whose norms are computed per sample by F.group_norm."""
    torch.manual_seed(8)
    model = build_model("resnet18a_vl").double()
    x, mask = place(torch.rand(len(LEADS), 2500, dtype=torch.float64) * 2 - 1, 3 * DOWNSAMPLE, [0, 300])

    def penalty_and_gradients() -> list[torch.Tensor]:
        penalty = jacobian_squared_norm(model, x, mask, projections=1, generator=torch.Generator().manual_seed(0))
        return [penalty, *torch.autograd.grad(penalty, list(model.parameters()), materialize_grads=True)]

    got, expected = penalty_and_gradients(), per_sample_norms(penalty_and_gradients)
    # GroupNorm over the two or three valid positions of the last blocks amplifies rounding in
    # second derivatives, hence a scale-relative bound.
    for a, b in zip(got, expected):
        assert (a - b).abs().max() <= 1e-6 * b.abs().max()
    assert got[0] > 0 and any(g.abs().sum() > 0 for g in got[1:])


@pytest.mark.slow  # the whole model forward and backward at T = 8192, twice
def test_float32_model_matches_the_per_sample_norms(per_sample_norms):
    """The training configuration (float32): logits and weight gradients of resnet18a_vl against
    the same model with its norms computed per sample by F.group_norm, to float32 rounding."""
    torch.manual_seed(10)
    model = build_model("resnet18a_vl")
    x, mask = place(torch.rand(len(LEADS), 6000) * 2 - 1, 8 * DOWNSAMPLE, [0, 1500])
    x[1] = 0.5 * x[1].roll(100, dims=1) * mask[1]
    y = torch.tensor([2, 5])

    def logits_and_gradients() -> list[torch.Tensor]:
        logits = model(x, mask)
        return [logits, *torch.autograd.grad(F.cross_entropy(logits, y), list(model.parameters()))]

    for got, expected in zip(logits_and_gradients(), per_sample_norms(logits_and_gradients)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_a_mask_of_another_dtype_than_x():
    """A float32 mask with a float64 x (the backward's bmm needs one dtype)."""
    norm = random_norm(3, 6)
    x, mask = interval_batch()
    expected = outputs_and_gradients(norm, norm, x, mask, 0.0)
    for got, want in zip(outputs_and_gradients(norm, norm, x, mask.float(), 0.0), expected):
        torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------- from_pretrained

def test_from_pretrained_returns_the_model_in_eval_mode_with_its_preprocessing(exported_model):
    run, folder = exported_model
    model = from_pretrained(folder)
    saved = torch.load(run / "model.pt", weights_only=True)
    assert not model.training and type(model).__name__ == "ResNet18A"
    assert model.config["preprocessing"]["leads"] == ["I", "II", "V1", "V2", "V3", "V4", "V5", "V6"]
    assert model.config["preprocessing"]["max_length"] == saved["config"]["max_length"]
    assert model.config["training"] == saved["config"]
    assert all(torch.equal(value, saved["model"][key]) for key, value in model.state_dict().items())


@pytest.mark.parametrize("change, problem", [
    (lambda c: c.update(architecture="resnet50"), "unknown architecture 'resnet50' (known: resnet18a, resnet18m, "
                                                  "resnet18a_vl)"),
    (lambda c: c.update(classes=c["classes"][:5]), "classes ['Normal', 'AF', 'I-AVB', 'LBBB', 'RBBB'] with "
                                                   "num_classes 9: this code classifies the 9 CPSC2018 classes"),
    (lambda c: c["architecture_args"].update(num_classes=5), "with num_classes 5: this code classifies the 9"),
    (lambda c: c.pop("training"), "no training (not a model folder of this project)"),
    (lambda c: c["preprocessing"].pop("padding_side"), "preprocessing lacks padding_side"),
    (lambda c: c["preprocessing"].update(normalisation="z-score"), "preprocessing normalisation 'z-score': this code "
                                                                   "applies 'each lead divided by its maximum"),
    (lambda c: c["preprocessing"].update(leads=["I", "II"]), "preprocessing leads ['I', 'II']: this code applies"),
    (lambda c: c["preprocessing"].update(input_length=3000), "preprocessing input length 3000 is not supported"),
    (lambda c: c.update(format_version=2), "format 'robust-ecg-cnn' version 2, this code reads 'robust-ecg-cnn' version 1"),
    (lambda c: c.update(architecture=["resnet18a"]), "unknown architecture ['resnet18a'] (known: resnet18a, "),
    (lambda c: c.update(architecture={}), "unknown architecture {} (known: resnet18a, "),
    (lambda c: c.update(training={}), "training lacks eval_batch_size"),
    (lambda c: c["training"].update(eval_batch_size=0), "training eval_batch_size 0: not a whole number of at least 1"),
    (lambda c: c["training"].update(eval_batch_size="18"), "training eval_batch_size '18': not a whole number of "),
    (lambda c: c["training"].update(eval_batch_size=18.0), "training eval_batch_size 18.0: not a whole number of "),
    (lambda c: c["training"].update(eval_batch_size=True), "training eval_batch_size True: not a whole number of "),
    (lambda c: c["preprocessing"].update(max_length=float("nan")), "preprocessing max_length nan, input_length 3072, "
                                                                   "bucket False: whole numbers"),
])
def test_a_tampered_config_is_refused_in_one_line_naming_it(exported_model, tmp_path, change, problem):
    folder = tampered(exported_model[1], tmp_path, change)
    with pytest.raises(ModelFolderError) as refused:
        from_pretrained(folder)
    message = str(refused.value)
    assert message.startswith(f"{folder / 'config.json'}: ") and problem in message and "\n" not in message


def test_weights_that_do_not_fit_are_refused_in_one_line_naming_the_file(exported_model, tmp_path):
    folder = tampered(exported_model[1], tmp_path, lambda c: c.update(architecture="resnet18m"))
    from_pretrained(folder)  # resnet18m has resnet18a's parameters
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(ModelFolderError, match=r"model.safetensors: does not load into a ResNet18M \(") as refused:
        from_pretrained(folder)
    assert "\n" not in str(refused.value)


def cast_classifier(dtype):
    return lambda tensors: tensors.update({"classifier.weight": tensors["classifier.weight"].to(dtype)})


def poison_classifier(value):
    return lambda tensors: tensors["classifier.weight"].view(-1)[7:9].fill_(value)


@pytest.mark.parametrize("weights, problem", [
    (cast_classifier(torch.float64), "tensor classifier.weight is torch.float64, the model's is torch.float32"),
    (cast_classifier(torch.float16), "tensor classifier.weight is torch.float16, the model's is torch.float32"),
    (cast_classifier(torch.int64), "tensor classifier.weight is torch.int64, the model's is torch.float32"),
    (poison_classifier(float("nan")), "tensor classifier.weight holds values that are not finite (NaN or infinity)"),
    (poison_classifier(float("-inf")), "tensor classifier.weight holds values that are not finite (NaN or infinity)"),
])
def test_weights_of_another_dtype_or_not_finite_are_refused_in_one_line_naming_the_tensor(exported_model, tmp_path,
                                                                                          weights, problem):
    """load_state_dict would cast them silently: the folder would load as another model than the one exported."""
    folder = tampered(exported_model[1], tmp_path, weights=weights)
    with pytest.raises(ModelFolderError) as refused:
        from_pretrained(folder)
    assert str(refused.value) == f"{folder / 'model.safetensors'}: {problem}"


@pytest.fixture
def offline(monkeypatch):
    """huggingface_hub in offline mode (HF_HUB_OFFLINE=1, read when it was imported): nothing leaves the machine."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_a_hub_repository_loads_from_the_hub_cache_offline(exported_model, tmp_path, offline):
    run, folder = exported_model
    snapshot = hub_cache(tmp_path / "hub", "ecg-lab/resnet18a-ce", folder)
    model = from_pretrained("ecg-lab/resnet18a-ce", cache_dir=tmp_path / "hub")
    assert torch.equal(logits_of(model), logits_of(from_pretrained(folder)))
    assert model.config == json.loads((snapshot / "config.json").read_text())


@pytest.mark.parametrize("name, problem", [
    ("ecg-lab/absent", "no such folder, and the Hub repository could not be fetched ("),
    ("no/such/folder", "no such folder, nor a Hub repository id (owner/name)"),
])
def test_a_repository_that_is_not_in_the_cache_offline_is_one_line(tmp_path, offline, name, problem):
    with pytest.raises(ModelFolderError) as refused:
        from_pretrained(name, cache_dir=tmp_path / "hub")
    assert str(refused.value).startswith(f"{name}: {problem}") and "\n" not in str(refused.value)
