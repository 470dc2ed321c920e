"""Configs made of parts: flat flag names in Python and on the command line, every problem of
every part named in one line each."""

from __future__ import annotations

import pytest

from model.describer import NetworkSettings
from model.retrieval import QueryExpansion
from pipeline.evaluate import EvaluateConf
from pipeline.serve import ServeConf
from pipeline.train import TrainConf
from tests.helpers import run_stage


def test_flat_flags_reach_the_parts_and_keep_their_defaults():
    conf = EvaluateConf.from_flags(dataset="d", data_root="r", max_size=512, qe_k=2)
    assert conf.network == NetworkSettings(max_size=512)
    assert conf.qe == QueryExpansion(qe_k=2)
    assert ServeConf.from_flags(index="i").qe == QueryExpansion(qe_k=10)  # serve's own default
    changed = conf.replaced(p=4.0, qe_alpha=1.0)
    assert changed.network.p == 4.0 and changed.network.max_size == 512
    assert changed.qe == QueryExpansion(qe_k=2, qe_alpha=1.0)
    assert changed.settings()["p"] == 4.0 and "network" not in changed.settings()
    train = TrainConf.from_flags(images="i", output="o", pairs="p", whiten_dim=64, nnum=2)
    assert train.lw.fit.whiten_dim == 64 and train.gem.nnum == 2
    with pytest.raises(TypeError, match="EvaluateConf has no setting qek"):
        EvaluateConf.from_flags(dataset="d", data_root="r", qek=2)


def test_the_command_line_names_every_problem_of_every_part():
    flags = ["--images", "i", "--output", "o", "--whiten-dim", "0", "--nnum", "0", "--lr", "-1"]
    done = run_stage("train", *flags)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "error: --nnum must be at least 1, not 0",
        "error: --whiten-dim must be at least 1, not 0",
        "error: --pairs is needed in GeM mode (the folder pipeline.pairs wrote)",
        "error: --lr must be positive, not -1.0",
    ]
