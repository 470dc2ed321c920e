"""The GeM and CGD heads: shapes, normalisation, gradients, and the descriptor letters."""

import pytest
import torch

from model.heads import CGDHead, GeMHead
from model.pooling import MAC, GeM, gem, l2n, mac, spoc


@pytest.fixture()
def fmap() -> torch.Tensor:
    return torch.rand(6, 32, 5, 4, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("letters", ["S", "M", "G", "SG", "MG", "SMG", "GMS"])
def test_cgd_shapes_and_unit_norm(fmap: torch.Tensor, letters: str) -> None:
    head = CGDHead(32, descriptors=letters, dim=24, num_classes=5)
    descriptor, logits = head(fmap, return_logits=True)
    assert descriptor.shape == (6, 24) and logits.shape == (6, 5)
    torch.testing.assert_close(descriptor.norm(dim=1), torch.ones(6))
    # Each descriptor's slice is itself L2-normalised before the final L2, so each slice
    # carries an equal share of the norm.
    parts = descriptor.view(6, len(letters), 24 // len(letters)).norm(dim=2)
    torch.testing.assert_close(parts, torch.full_like(parts, 1 / len(letters) ** 0.5))


def test_cgd_is_the_concatenation_of_projected_pools(fmap: torch.Tensor) -> None:
    head = CGDHead(32, descriptors="SMG", dim=12)
    pools = [spoc(fmap), mac(fmap), gem(fmap, p=3.0)]
    parts = [l2n(fc(x)) for fc, x in zip(head.projections, pools, strict=True)]
    torch.testing.assert_close(head(fmap), l2n(torch.cat(parts, dim=1)))


def test_cgd_classifier_reads_the_first_descriptor(fmap: torch.Tensor) -> None:
    head = CGDHead(32, descriptors="MG", dim=8, num_classes=3).eval()
    _, logits = head(fmap, return_logits=True)
    torch.testing.assert_close(logits, head.classifier(mac(fmap)))


def test_cgd_gradients_reach_every_parameter(fmap: torch.Tensor) -> None:
    head = CGDHead(32, descriptors="SMG", dim=24, num_classes=4, learn_p=True)
    fmap = fmap.requires_grad_()
    descriptor, logits = head(fmap, return_logits=True)
    (descriptor.sum() + logits.sum() + descriptor[:, 0].pow(2).sum()).backward()
    for name, param in head.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert fmap.grad is not None and fmap.grad.abs().sum() > 0


def test_cgd_without_classes_has_no_logits(fmap: torch.Tensor) -> None:
    _, logits = CGDHead(32, "SG", dim=8)(fmap, return_logits=True)
    assert logits is None


@pytest.mark.parametrize(
    ("letters", "dim", "message"),
    [
        ("SX", 8, r"unknown letter\(s\) \['X'\]"),
        ("", 8, "none given"),
        ("SS", 8, "repeat"),
        ("SMG", 10, "not divisible"),
    ],
)
def test_cgd_rejects_bad_descriptor_strings(letters: str, dim: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CGDHead(32, descriptors=letters, dim=dim)


def test_gem_head_optional_whitening(fmap: torch.Tensor) -> None:
    plain = GeMHead(32)
    torch.testing.assert_close(plain(fmap), l2n(gem(fmap, p=3.0)))
    assert plain.scale_exponent == pytest.approx(3.0)
    whitened = GeMHead(32, whitening_dim=16)
    out = whitened(fmap)
    assert out.shape == (6, 16)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(6))
    assert whitened.scale_exponent == 1.0  # a whitening layer mixes signs
    assert GeMHead(32, pooling="mac").scale_exponent == 1.0


def test_cgd_gem_p_is_fixed_unless_asked(fmap: torch.Tensor) -> None:
    """The CGD paper keeps GeM's p at 3; the parameter stays (same state-dict keys), frozen."""
    fixed = CGDHead(32, descriptors="SG", dim=8)
    assert "pools.1.p" in fixed.state_dict()
    assert isinstance(fixed.pools[1].p, torch.nn.Parameter)
    assert fixed.pools[1].p.requires_grad is False and fixed.pools[1].exponent == 3.0
    fixed(fmap).sum().backward()
    assert fixed.pools[1].p.grad is None
    learned = CGDHead(32, descriptors="SG", dim=8, learn_p=True)
    assert learned.pools[1].p.requires_grad is True
    assert learned.state_dict().keys() == fixed.state_dict().keys()


def test_gem_head_pooling_names_are_case_insensitive(fmap: torch.Tensor) -> None:
    head = GeMHead(32, "GeM", p=4.0, per_channel_p=True, learn_p=False)
    assert isinstance(head.pool, GeM)
    assert head.pool.p.shape == (32,) and head.pool.p.tolist() == [4.0] * 32
    assert head.pool.p.requires_grad is False and head.pooling == "gem"
    torch.testing.assert_close(head(fmap), l2n(gem(fmap, p=4.0)))
    mac_head = GeMHead(32, "MAC", p=4.0, per_channel_p=True)  # MAC has no p: ignored
    assert mac_head.pooling == "mac" and isinstance(mac_head.pool, MAC)
    assert list(mac_head.parameters()) == []
    torch.testing.assert_close(GeMHead(32, "SPoC")(fmap), l2n(spoc(fmap)))
    with pytest.raises(ValueError, match=r"unknown pooling 'rmac'; choose one of \['gem', 'mac'"):
        GeMHead(32, "rmac")
