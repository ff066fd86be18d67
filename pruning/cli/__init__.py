"""The ``actprune`` subcommands of the pruning side, one module each, and the checks they share."""

from __future__ import annotations

import argparse

from actprune.core.errors import UsageError

__all__ = ["add_device_flag", "check_anchor", "check_device"]


def check_anchor(anchor: str | None, weight: float | None, others: list[str]) -> None:
    """``--refit-anchor`` / ``--refit-anchor-weight``: a weight in [0, 1) that comes with an
    anchor, and an anchor that is none of ``others`` (the fit's own data, validation text: a
    text cannot be both what the refit must reproduce and what judges it)."""
    if weight is not None and anchor is None:
        raise UsageError("--refit-anchor-weight needs --refit-anchor SOURCE")
    if weight is not None and not 0.0 <= weight < 1.0:
        raise UsageError(f"--refit-anchor-weight must be in [0, 1), got {weight}")
    if anchor is not None and anchor in others:
        raise UsageError(f"--refit-anchor {anchor} is also the fit's data or validation text; pass text "
                         f"of another domain")


def add_device_flag(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--device``: where the offline passes run their float32 model (the whole model moves
    there: it must fit, 4 bytes a parameter, with the calibration hidden states beside it)."""
    p.add_argument("--device", default="auto",
                   help="auto (default: the first GPU when one is visible, else the CPU), cpu, cuda or cuda:N")


def check_device(name: str) -> str:
    """``--device`` checked before any data is read or model loaded (DeviceError naming what is
    visible); returns it for the passes."""
    from actprune.pruning.checkpoint.hf_io import compute_device

    compute_device(name)
    return name
