"""GeM generalises average and max pooling; the modules wrap the maths faithfully."""

import itertools

import pytest
import torch

from model.pooling import MAC, GeM, SPoC, build_pooling, gem, l2n, mac, pooling_name, spoc


@pytest.fixture()
def fmap() -> torch.Tensor:
    return torch.rand(4, 16, 7, 9, generator=torch.Generator().manual_seed(0)) + 0.01


def test_gem_with_p_one_is_spoc(fmap: torch.Tensor) -> None:
    torch.testing.assert_close(gem(fmap, p=1.0), spoc(fmap))
    torch.testing.assert_close(spoc(fmap), fmap.mean(dim=(2, 3)))


def test_gem_approaches_mac_as_p_grows(fmap: torch.Tensor) -> None:
    gaps = [(mac(fmap) - gem(fmap, p=p)).abs().max().item() for p in (3.0, 10.0, 50.0, 200.0)]
    assert all(a > b for a, b in itertools.pairwise(gaps)), gaps
    assert gaps[-1] < 0.03
    assert (gem(fmap, p=50.0) <= mac(fmap) + 1e-5).all()  # a power mean never exceeds the max


def test_gem_matches_its_definition(fmap: torch.Tensor) -> None:
    fmap = fmap - 0.3  # negatives are clamped to eps
    expected = fmap.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)
    torch.testing.assert_close(gem(fmap, p=3.0), expected)


def test_per_channel_gem_uses_each_channels_exponent(fmap: torch.Tensor) -> None:
    p = torch.linspace(1.0, 6.0, fmap.shape[1])
    out = gem(fmap, p=p)
    for c in (0, 7, 15):
        torch.testing.assert_close(out[:, c], gem(fmap[:, c : c + 1], p=float(p[c]))[:, 0])


def test_gem_module_learns_p(fmap: torch.Tensor) -> None:
    pool = GeM(p=3.0)
    pool(fmap).sum().backward()
    assert pool.p.grad is not None and pool.p.grad.abs().item() > 0
    assert GeM(p=2.0, learn_p=False).p.requires_grad is False
    assert GeM(channels=16).p.shape == (16,)


def test_modules_match_functions(fmap: torch.Tensor) -> None:
    torch.testing.assert_close(MAC()(fmap), mac(fmap))
    torch.testing.assert_close(SPoC()(fmap), spoc(fmap))
    torch.testing.assert_close(GeM(p=4.0)(fmap), gem(fmap, p=4.0))
    assert isinstance(build_pooling("GeM", p=2.0), GeM)


def test_pooling_names_are_case_insensitive_and_checked() -> None:
    assert [pooling_name(n) for n in ("GeM", "MAC", " spoc ", "gem")] == [
        "gem",
        "mac",
        "spoc",
        "gem",
    ]
    pool = build_pooling("GEM", p=4.0, learn_p=False, channels=3)
    assert isinstance(pool, GeM) and pool.p.tolist() == [4.0] * 3 and not pool.p.requires_grad
    assert isinstance(build_pooling("Mac", p=4.0), MAC)  # MAC has no p: ignored
    for bad in ("rmac", "", None):
        with pytest.raises(ValueError, match=r"choose one of \['gem', 'mac', 'spoc'\]"):
            pooling_name(bad)


def test_l2n_rows_have_unit_norm(fmap: torch.Tensor) -> None:
    norms = l2n(mac(fmap)).norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        gem(torch.rand(3, 4))
    with pytest.raises(ValueError, match="unknown pooling 'rmac'"):
        build_pooling("rmac")
    with pytest.raises(ValueError, match="positive"):
        GeM(p=0.0)
    with pytest.raises(ValueError, match="per-channel"):
        gem(torch.rand(1, 4, 2, 2), p=torch.ones(3))
