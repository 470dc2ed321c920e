"""The whiten stage on synthetic inputs: pairs mined from a synthetic sfm output, descriptors
as ImageNet Lite0 + GeM would name them; the output is a checkpoint with its whitening and a
manifest."""

from __future__ import annotations

import numpy as np
import pytest

from model import checkpoint, tables
from pipeline.pairs import PairsConf
from pipeline.pairs import run as mine_pairs
from pipeline.whiten import WhitenConf, run
from tests.helpers import synthetic_descriptors, synthetic_sfm


@pytest.fixture()
def chain(tmp_path) -> dict[str, str]:
    """The pairs stage's own return value, and descriptors of the same photos."""
    ids = synthetic_sfm(str(tmp_path / "sfm"))
    pairs = mine_pairs(PairsConf(sfm=str(tmp_path / "sfm"), output=str(tmp_path / "pairs")))
    descriptors = synthetic_descriptors(str(tmp_path / "d"), ids)
    return {"pairs": pairs, "descriptors": descriptors}


def _conf(chain: dict[str, str], output: str, **changes) -> WhitenConf:
    flags = {"descriptors": chain["descriptors"], "pairs": chain["pairs"], "output": output}
    return WhitenConf.from_flags(**{**flags, "whiten_shrinkage": 0.5, "whiten_dim": 16, **changes})


def test_whitening_from_the_pairs_stages_return_value_is_a_checkpoint(chain, tmp_path):
    out = run(_conf(chain, str(tmp_path / "lw")))
    loaded = checkpoint.load(out)
    assert loaded.whitening is not None and loaded.whitening.P.shape == (16, 1280)
    assert loaded.whitening.meta["pairs"] == 30 and loaded.whitening.meta["shrinkage"] == 0.5
    manifest = tables.WHITEN_OUTPUT.manifest(out)
    assert manifest.details["checkpoint"] == loaded.identity == checkpoint.identity(out)
    assert set(manifest.inputs) == {"descriptors", "pairs"}


def test_a_rerun_skips_and_another_dim_stops_naming_it(chain, tmp_path):
    conf = _conf(chain, str(tmp_path / "lw"))
    out = run(conf)
    first = tables.WHITEN_OUTPUT.manifest(out)
    assert run(conf) == out and tables.WHITEN_OUTPUT.manifest(out) == first
    with pytest.raises(tables.OutputChanged, match=r"whiten_dim: 16 → 8.*--overwrite"):
        run(conf.replaced(whiten_dim=8))
    run(conf.replaced(whiten_dim=8, overwrite=True))
    assert checkpoint.load(out).whitening.P.shape == (8, 1280)


def test_other_descriptors_learn_it_again(chain, tmp_path):
    conf = _conf(chain, str(tmp_path / "lw"))
    before = checkpoint.load(run(conf)).whitening
    ids = tables.DESCRIPTORS.read(chain["descriptors"], ["image_id"])["image_id"].to_pylist()
    synthetic_descriptors(chain["descriptors"], ids, seed=1)
    after = checkpoint.load(run(conf)).whitening
    assert not np.allclose(before.m, after.m)


def test_whitening_an_already_whitened_network_is_refused(chain, tmp_path):
    out = run(_conf(chain, str(tmp_path / "lw")))
    ids = tables.DESCRIPTORS.read(chain["descriptors"], ["image_id"])["image_id"].to_pylist()
    whitened = synthetic_descriptors(str(tmp_path / "w"), ids, weights=out)
    with pytest.raises(ValueError, match="already whitened"):
        run(_conf(chain, str(tmp_path / "lw2"), descriptors=whitened))


def test_bad_settings_and_missing_inputs_are_each_named(tmp_path):
    with pytest.raises(ValueError, match="--whiten-shrinkage is a share"):
        WhitenConf.from_flags(descriptors="d", pairs="p", output="o", whiten_shrinkage=1.5)
    with pytest.raises(ValueError) as caught:
        missing = WhitenConf(
            descriptors=str(tmp_path / "d"), pairs=str(tmp_path / "p"), output=str(tmp_path / "o")
        )
        run(missing)
    assert "--descriptors" in str(caught.value) and "--pairs" in str(caught.value)
