"""Loading weights: one loader for every trunk and checkpoint, one error type for every failure.

Weights come from a local path or any URI the storage layer reads (``s3://``); they are loaded
with ``weights_only=True``, so a weights file can never run code.

Every way weights can fail raises :class:`WeightsError` with a message that names the file (or
package) and says what to do: a file or object that is not there, one that cannot be read as a
PyTorch state dict, a weight package that is not installed, and tensors that are missing, unused
or of the wrong shape for the network they are loaded into.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping

import torch

from model.storage import read_bytes

__all__ = ["WeightsError", "load_state_dict"]


class WeightsError(ValueError):
    """Weights that cannot be found, read or matched to the network."""


def _some(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


def _cause(err: Exception) -> str:
    """The gist of torch.load's error: its long weights-only advice is cut to the actual cause."""
    text = str(err)
    marker = "WeightsUnpickler error:"
    if marker in text:
        detail = text.split(marker, 1)[1].strip().split("\n\n")[0].split(". ")[0]
        return f"the weights-only unpickler refused it: {detail.strip()}"
    first = text.strip().splitlines()[0] if text.strip() else repr(err)
    return first.split(". ")[0][:300]


def load_state_dict(uri: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A state dict from a path or URI, loaded with ``weights_only=True`` (no code runs).

    Accepts a bare state dict or one wrapped as ``{"state_dict": ...}`` / ``{"model": ...}``,
    and strips the ``module.`` prefix that DDP adds. Raises :class:`WeightsError` naming ``uri``
    when there is nothing there, it cannot be read, or it is not a non-empty mapping from names
    to tensors.
    """
    try:
        data = read_bytes(uri)
    except FileNotFoundError:
        raise WeightsError(f"weights file not found: {uri}") from None
    except Exception as err:  # a bad URI, S3 credentials or network, permissions
        raise WeightsError(f"cannot read weights file {uri} ({type(err).__name__}: {err})") from err
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # the unpickler raises anything from IndexError to RuntimeError
        raise WeightsError(
            f"weights file {uri} is not a readable PyTorch state dict ({type(err).__name__}: "
            f"{_cause(err)}); it may be truncated, not a torch.save file, or hold objects other "
            "than tensors, which are never unpickled: save model.state_dict() again"
        ) from err
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not obj:
        what = "an empty mapping" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
        raise WeightsError(
            f"weights file {uri} holds {what}, not a state dict (a non-empty mapping from "
            "parameter names to tensors)"
        )
    not_tensors = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise WeightsError(
            f"weights file {uri} does not hold a state dict of tensors: {_some(not_tensors)} "
            "are not tensors (a training checkpoint? save model.state_dict() instead)"
        )
    return {str(k).removeprefix("module."): v for k, v in obj.items()}
