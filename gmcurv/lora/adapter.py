"""LoRA adapters in memory: the config, the low-rank layers, validation and building.

Keys (``base_model.model.`` prefix optional; the ``.default`` adapter-name infix some PEFT
versions write, ``lora_A.default.weight``, is accepted)::

    <module>.lora_A.weight            [r, in]          nn.Linear (and HF Conv1D)
    <module>.lora_B.weight            [out, r]
    <module>.lora_A.weight            [r, in, kh, kw]  nn.Conv2d
    <module>.lora_B.weight            [out, r, 1, 1]
    <module>.lora_embedding_A         [r, V]           nn.Embedding (update (B A)^T)
    <module>.lora_embedding_B         [E, r]

The update of a layer is ``ΔW = s B A`` with ``s = alpha / r`` (``alpha / sqrt(r)`` with
``use_rslora``); ``r`` and ``alpha`` come from ``rank_pattern`` / ``alpha_pattern`` when a
pattern matches the module (PEFT's rule: the pattern matches the end of the module path).
Files are read and written by `gmcurv.io.adapter`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gmcurv.errors import GmcurvError, UnsupportedError

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
CONFIG_METADATA_KEY = "adapter_config"  # config JSON inside a single-file adapter's header
PEFT_PREFIX = "base_model.model."

_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.(?P<name>[^.]+))?(?:\.(?P<tensor>weight|bias))?$"
)
_UNSUPPORTED_PARTS = {
    "lora_magnitude_vector": "DoRA (use_dora) adapters",
    "lora_E": "AdaLoRA adapters",
}


class AdapterError(GmcurvError):
    """A LoRA adapter cannot be read, is malformed, or does not fit the base model."""


@dataclass(frozen=True)
class LoraConfig:
    """The fields of ``adapter_config.json`` that change the update ``ΔW``."""

    r: int
    lora_alpha: float
    target_modules: list[str] | str | None = None
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)  # the whole file, written back on export

    @staticmethod
    def _pattern(patterns: Mapping[str, Any], module: str) -> str | None:
        """The first pattern key matching the end of `module` (PEFT's ``get_pattern_key``)."""
        for key in patterns:
            try:
                if re.fullmatch(rf"(.*\.)?(?:{key})", module):
                    return key
            except re.error:
                if module == key or module.endswith("." + key):
                    return key
        return None

    def rank_for(self, module: str) -> int:
        key = self._pattern(self.rank_pattern, module)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module: str) -> float:
        key = self._pattern(self.alpha_pattern, module)
        return float(self.alpha_pattern[key]) if key is not None else self.lora_alpha

    def scale_for(self, module: str, rank: int) -> float:
        """``s = alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``."""
        alpha = self.alpha_for(module)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def targets(self, module: str) -> bool | None:
        """Whether ``target_modules`` names `module` (None when it cannot say)."""
        t = self.target_modules
        if t is None or t == "all-linear":
            return None
        if isinstance(t, str):
            try:
                return re.fullmatch(t, module) is not None
            except re.error:
                return None
        return any(module == name or module.endswith("." + name) for name in t)


@dataclass(frozen=True)
class LoraLayer:
    """One adapted module: factors as stored, and the scale of its update ``ΔW = s B A``."""

    module: str  # module path in the base model (PEFT prefix removed)
    kind: str  # linear | conv2d | embedding
    A: Tensor  # [r, in] | [r, in, kh, kw] | [r, V]
    B: Tensor  # [out, r] | [out, r, 1, 1] | [E, r]
    alpha: float
    scale: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def matrices(self) -> tuple[Tensor, Tensor]:
        """``(B2 [m, r], A2 [r, k])``: the factors as matrices; the update is ``s B2 A2``
        (PEFT's orientation: ``[out, in·kh·kw]``; for embeddings ``[E, V]``, transposed
        against the table)."""
        r = self.rank
        return self.B.reshape(self.B.shape[0], r), self.A.reshape(r, -1)

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, k)`` of the update matrix ``s B2 A2``."""
        B2, A2 = self.matrices()
        return int(B2.shape[0]), int(A2.shape[1])

    @property
    def n_params(self) -> int:
        return self.A.numel() + self.B.numel()


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter: its config and low-rank layers (read from disk or built in memory)."""

    name: str
    path: Path  # what the user named (directory or file)
    weights_path: Path
    sha256: str
    config: LoraConfig
    layers: dict[str, LoraLayer]  # by module path, in file order
    ignored: tuple[str, ...] = ()  # entries that are not part of the low-rank update
    dtype: torch.dtype = torch.float32  # storage dtype of the factors

    @property
    def n_params(self) -> int:
        return sum(layer.n_params for layer in self.layers.values())

    def with_factors(self, factors: Mapping[str, tuple[Tensor, Tensor]]) -> Adapter:
        """The same adapter with some layers' ``(B, A)`` replaced (stored shapes kept)."""
        layers = dict(self.layers)
        for module, (B, A) in factors.items():
            old = layers[module]
            layers[module] = replace(old, B=B.reshape(old.B.shape), A=A.reshape(old.A.shape))
        return replace(self, layers=layers)


def is_lora_key(key: str) -> bool:
    """Does a tensor name look like a LoRA factor (``<module>.lora_A.weight`` ...)?"""
    return _KEY.match(key) is not None


def parse_config(raw: Any, where: Path) -> LoraConfig:
    """Validate an ``adapter_config.json`` object (`where` names it in errors)."""
    if not isinstance(raw, dict):
        raise AdapterError(
            f"{where}: the adapter config is not a JSON object",
            hint=f"use the {CONFIG_NAME} peft wrote with the adapter",
        )
    peft_type = str(raw.get("peft_type") or "LORA").upper()
    if peft_type != "LORA":
        raise UnsupportedError(
            f"{where}: peft_type {peft_type} is not a LoRA adapter",
            hint="gmcurv lora reads LoRA adapters (peft_type LORA)",
        )
    if raw.get("use_dora"):
        raise UnsupportedError(
            f"{where}: DoRA adapters (use_dora) are not supported",
            hint="their update is not the low-rank product s B A; use a plain LoRA adapter",
        )
    for key in ("r", "lora_alpha"):
        if key not in raw:
            raise AdapterError(f"{where}: the config has no {key!r}", hint=f"add {key} to it")
    r, alpha = raw["r"], raw["lora_alpha"]
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterError(f"{where}: r must be a positive integer, got {r!r}", hint="fix r")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise AdapterError(
            f"{where}: lora_alpha must be a number, got {alpha!r}", hint="fix lora_alpha"
        )
    targets = raw.get("target_modules")
    if targets is not None and not isinstance(targets, str):
        targets = [str(t) for t in targets]
    patterns = {}
    for key in ("rank_pattern", "alpha_pattern"):
        value = raw.get(key) or {}
        if not isinstance(value, dict):
            raise AdapterError(
                f"{where}: {key} must be an object, got {value!r}",
                hint=f"{key} maps module-name patterns to values",
            )
        patterns[key] = value
    return LoraConfig(
        r=r,
        lora_alpha=float(alpha),
        target_modules=targets,
        use_rslora=bool(raw.get("use_rslora", False)),
        fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        rank_pattern={str(k): int(v) for k, v in patterns["rank_pattern"].items()},
        alpha_pattern={str(k): float(v) for k, v in patterns["alpha_pattern"].items()},
        raw=dict(raw),
    )


def _strip(module: str) -> str:
    return module[len(PEFT_PREFIX) :] if module.startswith(PEFT_PREFIX) else module


def parse_keys(
    tensors: Mapping[str, Tensor], where: Path
) -> tuple[dict[str, dict[str, tuple[str, Tensor]]], list[str]]:
    """``{module: {part: (key, tensor)}}`` and the keys that are not LoRA factors."""
    parts: dict[str, dict[str, tuple[str, Tensor]]] = {}
    names: set[str] = set()
    ignored = []
    for key, t in tensors.items():
        for marker, what in _UNSUPPORTED_PARTS.items():
            if f".{marker}" in key:
                raise UnsupportedError(
                    f"{where}: {key!r} belongs to {what}, which gmcurv lora does not support",
                    hint="use a plain LoRA adapter (update s B A)",
                )
        m = _KEY.match(key)
        if m is None:
            ignored.append(key)
            continue
        name, tensor = m["name"], m["tensor"]
        if name in ("weight", "bias") and tensor is None:  # lora_embedding_A.weight form
            name, tensor = None, name
        if tensor == "bias":
            raise UnsupportedError(
                f"{where}: {key!r} is a LoRA bias (lora_bias=True), which gmcurv does not support",
                hint="use an adapter trained without lora_bias",
            )
        if name is not None:
            names.add(name)
        module = _strip(m["module"])
        part = m["part"].replace("embedding_", "")
        if part in parts.setdefault(module, {}):
            raise AdapterError(
                f"{where}: module {module} has two {m['part']} entries",
                hint="the file holds several adapters; save one adapter per directory",
            )
        parts[module][part] = (key, t)
        if "embedding" in m["part"]:
            parts[module]["embedding"] = (key, t)
    if len(names) > 1:
        raise AdapterError(
            f"{where}: the file holds several adapters ({', '.join(sorted(names))})",
            hint="save each adapter to its own directory (peft: save_pretrained per adapter)",
        )
    return parts, ignored


def build_layer(module: str, found: dict[str, tuple[str, Tensor]], cfg: LoraConfig, where: Path):
    for part in ("A", "B"):
        if f"lora_{part}" not in found:
            other = found["lora_B" if part == "A" else "lora_A"][0]
            raise AdapterError(
                f"{where}: module {module} has {other} but no lora_{part} factor",
                hint="the adapter file is incomplete; re-save it",
            )
    (key_a, A), (key_b, B) = found["lora_A"], found["lora_B"]
    embedding = "embedding" in found
    if not (A.is_floating_point() and B.is_floating_point()):
        raise AdapterError(
            f"{where}: {key_a} / {key_b} are not floating-point tensors",
            hint="LoRA factors are float tensors; is this a quantised adapter?",
        )
    if embedding:
        kind, ok = "embedding", A.ndim == 2 and B.ndim == 2
    elif A.ndim == 4:
        kind, ok = "conv2d", B.ndim == 4 and tuple(B.shape[2:]) == (1, 1)
    else:
        kind, ok = "linear", A.ndim == 2 and B.ndim == 2
    if not ok:
        raise AdapterError(
            f"{where}: module {module}: factor shapes {tuple(A.shape)} (A) and "
            f"{tuple(B.shape)} (B) are not those of a LoRA layer",
            hint="expected A [r, in] and B [out, r] (conv: [r, in, kh, kw] and [out, r, 1, 1])",
        )
    r_a, r_b = int(A.shape[0]), int(B.shape[1])
    if r_a != r_b:
        raise AdapterError(
            f"{where}: module {module}: rank mismatch, lora_A has {r_a} rows but lora_B has "
            f"{r_b} columns",
            hint="A must be [r, in] and B [out, r] with the same r",
        )
    expected = cfg.rank_for(module)
    if r_a != expected:
        source = "rank_pattern" if expected != cfg.r else "r"
        raise AdapterError(
            f"{where}: module {module}: the factors have rank {r_a} but the config says "
            f"{source} = {expected}",
            hint="the config does not belong to these weights; use the adapter_config.json "
            "saved with them",
        )
    for key, t in ((key_a, A), (key_b, B)):
        if not torch.isfinite(t).all():
            raise AdapterError(
                f"{where}: {key} contains NaN or Inf values",
                hint="training diverged or the file is damaged; use another checkpoint",
            )
    return LoraLayer(
        module=module,
        kind=kind,
        A=A,
        B=B,
        alpha=cfg.alpha_for(module),
        scale=cfg.scale_for(module, r_a),
    )


def make_adapter(
    factors: Mapping[str, tuple[Tensor, Tensor]],
    r: int,
    lora_alpha: float,
    name: str = "adapter",
    embeddings: tuple[str, ...] = (),
    **config: Any,
) -> Adapter:
    """An in-memory adapter from ``{module: (B, A)}`` in PEFT shapes (e.g. factors trained
    by hand), validated like a file; `config` adds ``adapter_config.json`` fields."""
    if not factors:
        raise AdapterError(f"adapter {name}: no factors given", hint="pass {module: (B, A)}")
    raw = {"peft_type": "LORA", "r": r, "lora_alpha": lora_alpha, "bias": "none"}
    raw.setdefault("target_modules", sorted({m.rsplit(".", 1)[-1] for m in factors}))
    raw.update(config)
    where = Path(name)
    cfg = parse_config(raw, where)
    layers = {}
    for module, (B, A) in factors.items():
        part = "embedding" if module in embeddings else "weight"
        found = {
            "lora_A": (f"{module}.lora_A", A.detach()),
            "lora_B": (f"{module}.lora_B", B.detach()),
        }
        if part == "embedding":
            found["embedding"] = found["lora_A"]
        layers[module] = build_layer(module, found, cfg, where)
    dtype = next(iter(layers.values())).A.dtype if layers else torch.float32
    return Adapter(name, where, where, "", cfg, layers, (), dtype)


def adapter_state(adapter: Adapter) -> dict[str, Tensor]:
    """The factors under PEFT's keys (``base_model.model.<module>.lora_A.weight`` ...)."""
    out = {}
    for module, layer in adapter.layers.items():
        if layer.kind == "embedding":
            a, b = "lora_embedding_A", "lora_embedding_B"
        else:
            a, b = "lora_A.weight", "lora_B.weight"
        out[f"{PEFT_PREFIX}{module}.{a}"] = layer.A.detach().contiguous().cpu()
        out[f"{PEFT_PREFIX}{module}.{b}"] = layer.B.detach().contiguous().cpu()
    return out
