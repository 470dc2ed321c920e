"""Off-the-shelf retrieval on the shared real photos (17 scenes): the pretrained network sees."""

import torch

from model.backbones import build_backbone
from model.extraction import ExtractOptions, ImageFiles, extract_multihead
from model.heads import GeMHead
from model.retrieval import QueryExpansion
from model.scoring import PostProcess, score


def test_pretrained_lite0_gem_retrieves_real_scenes(real_photo_set, lite0_real_descriptors):
    metrics, _, _ = score(lite0_real_descriptors, lite0_real_descriptors, real_photo_set)
    assert len(real_photo_set.db_paths) >= 300 and len(real_photo_set.label_names) == 17
    assert metrics["map"] >= 0.95, metrics
    assert metrics["recall@k"][1] >= 0.95
    # αQE must not hurt a ranking this good.
    with_qe, _, _ = score(
        lite0_real_descriptors,
        lite0_real_descriptors,
        real_photo_set,
        post=PostProcess(qe=QueryExpansion(qe_k=2)),
    )
    assert with_qe["map"] >= metrics["map"] - 0.01


def test_untrained_lite0_is_far_worse(real_photo_set, lite0_real_descriptors):
    """The floor above means something only if a network that has not learned stays below it.

    Random weights still pool colour and texture statistics, which separate these 17 scenes
    fairly well (about 0.8 mAP), so the gap, not zero, is what training must show.
    """
    torch.manual_seed(0)
    random = extract_multihead(
        build_backbone("efficientnet_lite0"),
        {"gem": GeMHead(1280)},
        ImageFiles(real_photo_set.db_paths, max_size=256, exif_transpose=True),
        options=ExtractOptions(device="cpu", progress=False),
    ).descriptors["gem"]
    random_map = score(random, random, real_photo_set)[0]["map"]
    pretrained_map = score(lite0_real_descriptors, lite0_real_descriptors, real_photo_set)[0]
    assert random_map < 0.9
    assert pretrained_map["map"] > random_map + 0.1, (pretrained_map["map"], random_map)
