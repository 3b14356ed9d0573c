import pytest
import torch

from ECG_CNN import DOWNSAMPLE, build_model, check_length, count_parameters, masked_average_pool


def test_resnet18a_has_the_papers_parameter_count():
    assert count_parameters(build_model("resnet18a")) == 4_994_953


def test_resnet18m_shares_the_trunk_and_classifier_sizes():
    assert count_parameters(build_model("resnet18m")) == 4_994_953


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
        features = model.trunk(torch.zeros(1, 8, 33792))
    assert features.shape == (1, 512, 31)


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
