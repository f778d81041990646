"""The GradMetaNet head as a runnable object: weights + metadata -> `LoadedHead`.

The head file's metadata (JSON under ``gmcurv_head``): ``format``, ``version``, ``config``
(`HeadConfig`), ``targets``, ``training`` (the zoo and `TrainConfig` it came from),
``supported`` (loss, Fisher, activations, depths) and ``metrics`` (held-out accuracy and
calibrated intervals, written by ``gmcurv head eval --record``). Reading and writing the
file: `gmcurv.gradmetanet.pretrained`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gmcurv.errors import CheckpointError, UnsupportedError
from gmcurv.gradmetanet.calibration import Calibration
from gmcurv.gradmetanet.features import MLPChain
from gmcurv.gradmetanet.model import PARAM_TARGETS, SCALAR_TARGETS, GradMetaNet, HeadConfig

HEAD_FORMAT = 1
META_KEY = "gmcurv_head"


@dataclass
class LoadedHead:
    """A head ready to run, with its metadata."""

    model: GradMetaNet
    meta: dict[str, Any]
    path: Path

    @property
    def version(self) -> str:
        return str(self.meta.get("version", "?"))

    @property
    def supported(self) -> dict[str, Any]:
        return self.meta.get("supported", {})

    def check(self, chain: MLPChain, widths: list[int] | None = None) -> list[str]:
        """Refuse MLPs outside what the head was trained on (with the --method exact hint);
        return warnings for supported-but-unseen sizes (see `out_of_range` for all flags)."""
        sup = self.supported
        acts = sup.get("activations")
        hint = "use --method exact (or auto); the head's card lists what it supports"
        if acts and chain.activation not in acts:
            raise UnsupportedError(
                f"the GradMetaNet head was trained on {', '.join(acts)} MLPs, not "
                f"{chain.activation}",
                hint=hint,
            )
        lo, hi = sup.get("min_layers", 1), sup.get("max_layers", 99)
        if not lo <= chain.depth <= hi:
            raise UnsupportedError(
                f"the GradMetaNet head supports MLPs with {lo} to {hi} linear layers, "
                f"this one has {chain.depth}",
                hint=hint,
            )
        return [f.text() for f in self.out_of_range(chain, widths)]

    @property
    def calibration(self) -> Calibration | None:
        """The calibrated intervals recorded by ``gmcurv head eval --record`` (or None)."""
        d = self.meta.get("metrics", {}).get("intervals")
        return Calibration.from_dict(d) if d else None

    def out_of_range(
        self, chain: MLPChain, widths: list[int] | None = None, mean_loss: float | None = None
    ) -> list[RangeFlag]:
        """Inputs outside what the head was trained on (it still answers; its card's errors
        may not hold): hidden widths, depth, activation, and the mean loss of the set
        against the range seen on the calibration models."""
        sup = self.supported
        flags = []
        trained = sup.get("trained_widths") or []
        if widths and trained:
            lo, hi = min(trained), max(trained)
            bad = sorted({w for w in widths if not lo <= w <= hi})
            if bad:
                flags.append(RangeFlag("width", ",".join(map(str, bad)), f"{lo}-{hi}"))
        depths = sup.get("trained_depths")
        if not depths and "min_layers" in sup and "max_layers" in sup:
            depths = [sup["min_layers"], sup["max_layers"] - 1]  # max_layers: one beyond
        if depths and not min(depths) <= chain.depth <= max(depths):
            flags.append(RangeFlag("depth", str(chain.depth), f"{min(depths)}-{max(depths)}"))
        acts = sup.get("activations")
        if acts and chain.activation not in acts:
            flags.append(RangeFlag("activation", chain.activation, ",".join(acts)))
        loss_range = self.meta.get("metrics", {}).get("ranges", {}).get("loss")
        if loss_range and mean_loss is not None:
            lo_l, hi_l = loss_range
            if not lo_l <= mean_loss <= hi_l:
                flags.append(RangeFlag("loss", f"{mean_loss:.3g}", f"{lo_l:.3g}-{hi_l:.3g}"))
        return flags


@dataclass(frozen=True)
class RangeFlag:
    """One input of the model outside the head's training range."""

    what: str  # width | depth | activation | loss
    value: str
    seen: str

    def text(self) -> str:
        label = {"width": "hidden width", "depth": "linear layers", "loss": "mean loss"}
        return f"{label.get(self.what, self.what)} {self.value} (head trained on {self.seen})"


def head_metadata(
    config: HeadConfig,
    training: dict[str, Any],
    supported: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    version: str = "1",
) -> dict[str, Any]:
    return {
        "format": HEAD_FORMAT,
        "version": version,
        "config": config.to_dict(),
        "targets": {"per_parameter": list(PARAM_TARGETS), "scalars": list(SCALAR_TARGETS)},
        "training": training,
        "supported": supported,
        "metrics": metrics or {},
    }


def head_state(model: GradMetaNet) -> dict[str, Tensor]:
    """The head's weights as float32 tensors, ready to save."""
    return {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}


def head_from_state(
    state: Mapping[str, Tensor],
    meta: dict[str, Any],
    path: Path,
    dtype: torch.dtype = torch.float32,
) -> LoadedHead:
    """Build the head `meta` describes and load `state` into it (`path` names the file in
    errors)."""
    if meta.get("format") != HEAD_FORMAT:
        raise CheckpointError(
            f"{path}: head format {meta.get('format')} is not supported (expected {HEAD_FORMAT})",
            hint="retrain it with this version: gmcurv head train",
        )
    model = GradMetaNet(HeadConfig(**meta["config"]))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(
            f"{path}: weights do not fit the head's config: {str(e).splitlines()[0]}",
            hint="the file is damaged or from another version; retrain with gmcurv head train",
        ) from None
    model = model.to(dtype).eval()
    return LoadedHead(model, meta, path)
