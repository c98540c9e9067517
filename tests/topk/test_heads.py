"""The cosine head outputs cosines of the feature and class-weight directions."""

import pytest
import torch

from topk.heads import CosineHead


def test_matches_cosine_similarity():
    torch.manual_seed(0)
    head = CosineHead(6, 4).double()
    features = torch.randn(5, 6, dtype=torch.float64) * 30
    expected = torch.stack(
        [
            torch.stack([torch.nn.functional.cosine_similarity(f, w, dim=0) for w in head.weight])
            for f in features
        ]
    )
    torch.testing.assert_close(head(features), expected)


def test_scale_invariant_and_bounded():
    torch.manual_seed(1)
    head = CosineHead(8, 3)
    features = torch.randn(4, 8)
    torch.testing.assert_close(head(features), head(features * 1e4))
    out = head(torch.randn(64, 8) * 1e3)
    assert out.abs().max() <= 1.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_and_zero_features(dtype):
    head = CosineHead(4, 3)
    out = head(torch.zeros(2, 4, dtype=dtype))
    assert out.dtype == dtype
    assert torch.equal(out.float(), torch.zeros(2, 3))


def test_autocast_and_gradients_flow():
    head = CosineHead(4, 3)
    features = torch.randn(2, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(features)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert torch.isfinite(head.weight.grad).all() and torch.isfinite(features.grad).all()


def test_bad_sizes_and_shapes():
    with pytest.raises(ValueError, match="in_features"):
        CosineHead(0, 3)
    with pytest.raises(ValueError, match="num_classes"):
        CosineHead(3, -1)
    with pytest.raises(ValueError, match=r"\[batch, 4\]"):
        CosineHead(4, 3)(torch.zeros(2, 5))
