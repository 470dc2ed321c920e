"""The checkpoint module: save writes meta.json last, load checks the content identity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model import checkpoint, storage
from model.networks import NetworkMeta, build_network


@pytest.fixture(scope="module")
def network():
    torch.manual_seed(0)
    return build_network(NetworkMeta(backbone="efficientnet_lite0"), weights=None).eval()


def test_a_saved_checkpoint_loads_the_same_network_and_whitening(tmp_path, network):
    rng = np.random.default_rng(0)
    m, P = rng.normal(size=network.out_dim), rng.normal(size=(8, network.out_dim))
    identity = checkpoint.save(str(tmp_path / "ck"), network, (m, P), whitening_meta={"pairs": 3})
    assert checkpoint.is_checkpoint(str(tmp_path / "ck"))
    assert checkpoint.identity(str(tmp_path / "ck")) == identity
    loaded = checkpoint.load(str(tmp_path / "ck"))
    assert loaded.identity == identity
    np.testing.assert_array_equal(loaded.whitening.P, P)
    assert loaded.whitening.meta == {"pairs": 3}
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded.network(x), network(x))


def test_identity_follows_content_and_a_changed_file_is_refused(tmp_path, network):
    plain = checkpoint.save(str(tmp_path / "a"), network)
    again = checkpoint.save(str(tmp_path / "b"), network)
    assert plain == again
    whitened = checkpoint.save(
        str(tmp_path / "c"), network, (np.zeros(network.out_dim), np.eye(network.out_dim))
    )
    assert whitened != plain
    # saving without whitening over a whitened checkpoint removes the old whitening
    checkpoint.save(str(tmp_path / "c"), network)
    assert not (tmp_path / "c" / checkpoint.WHITENING_FILE).exists()
    assert checkpoint.load(str(tmp_path / "c")).whitening is None
    (tmp_path / "a" / checkpoint.MODEL_FILE).write_bytes(
        (tmp_path / "a" / checkpoint.MODEL_FILE).read_bytes()[:-8] + b"12345678"
    )
    with pytest.raises(ValueError, match="changed after it was written"):
        checkpoint.load(str(tmp_path / "a"))


def test_named_weights_and_folders_without_meta_are_not_checkpoints(tmp_path, network):
    assert not checkpoint.is_checkpoint("imagenet")
    assert not checkpoint.is_checkpoint("random")
    storage.write_bytes(str(tmp_path / "half" / checkpoint.MODEL_FILE), b"weights")
    assert not checkpoint.is_checkpoint(str(tmp_path / "half"))
    with pytest.raises(FileNotFoundError, match="is not a checkpoint"):
        checkpoint.load(str(tmp_path / "half"))


def test_checkpoints_on_s3(s3_bucket, network):
    uri = f"s3://{s3_bucket}/train/checkpoint"
    identity = checkpoint.save(uri, network)
    assert checkpoint.is_checkpoint(uri)
    assert checkpoint.load(uri).identity == identity
