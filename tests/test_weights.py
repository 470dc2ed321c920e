"""The one weights loader: what it accepts, and a WeightsError naming the file for the rest."""

import re
from pathlib import Path

import pytest
import torch

from model.weights import WeightsError, load_state_dict


def _state() -> dict[str, torch.Tensor]:
    return {"conv.weight": torch.arange(6.0).view(2, 3), "bn.running_mean": torch.ones(2)}


def test_plain_wrapped_and_ddp_state_dicts_load(tmp_path: Path) -> None:
    state = _state()
    for i, obj in enumerate(
        (
            state,
            {"state_dict": state},
            {"model": {f"module.{k}": v for k, v in state.items()}},
        )
    ):
        torch.save(obj, tmp_path / f"{i}.pt")
        loaded = load_state_dict(tmp_path / f"{i}.pt")
        assert loaded.keys() == state.keys()
        for key, value in state.items():
            assert torch.equal(loaded[key], value)
    assert load_state_dict(str(tmp_path / "0.pt")).keys() == state.keys()  # str paths too


def test_missing_file_is_a_weights_error_naming_it(tmp_path: Path) -> None:
    absent = tmp_path / "absent.pth"
    with pytest.raises(WeightsError, match=f"not found: {re.escape(str(absent))}"):
        load_state_dict(absent)


def test_corrupt_or_truncated_file_names_the_file(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint\n" * 10)
    whole = tmp_path / "whole.pth"
    torch.save({"w": torch.zeros(64, 64)}, whole)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(whole.read_bytes()[:2000])
    for path in (garbage, truncated):
        with pytest.raises(
            WeightsError, match=f"{re.escape(str(path))} is not a readable PyTorch state dict"
        ):
            load_state_dict(path)


def test_a_weights_file_never_runs_code(tmp_path: Path) -> None:
    # weights_only=True: a pickled arbitrary object is refused, not unpickled.
    pickled = tmp_path / "pickled.pth"
    torch.save({"w": torch.zeros(1), "obj": Path("x")}, pickled)
    with pytest.raises(WeightsError, match=re.escape(str(pickled))) as info:
        load_state_dict(pickled)
    assert "weights-only unpickler refused it: Unsupported global" in str(info.value)
    assert "PosixPath" in str(info.value)


def test_weights_file_must_be_a_non_empty_state_dict_of_tensors(tmp_path: Path) -> None:
    cases = {
        "list.pth": ([torch.zeros(1)], "holds a list, not a state dict"),
        "empty.pth": ({}, "holds an empty mapping, not a state dict"),
        "mixed.pth": ({"w": torch.zeros(1), "epoch": 3}, r"epoch are not tensors"),
    }
    for name, (obj, message) in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(WeightsError, match=message) as info:
            load_state_dict(tmp_path / name)
        assert name in str(info.value)


def test_weights_error_is_a_value_error() -> None:
    assert issubclass(WeightsError, ValueError)
