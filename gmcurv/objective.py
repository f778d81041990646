"""The objective: a model, a per-example loss and the parameters curvature is taken over.

``L(θ) = (1/N) Σ_n L_n(θ)`` with ``L_n`` from `gmcurv.losses`. Models run in eval mode by
default (deterministic, examples independent); see `gmcurv.modes` for what train mode
means with Dropout and why it is refused with BatchNorm.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from gmcurv.batch import Batch, Inputs, batch_size_of
from gmcurv.data import DataSample
from gmcurv.errors import ArchitectureError, ConfigError, DataError
from gmcurv.losses import CallableLoss, CrossEntropy, Loss, get_loss
from gmcurv.modes import apply_mode
from gmcurv.params import ParamSpace


def output_tensor(out: object) -> Tensor:
    """The tensor a model's forward stands for: the analysed function ``f(x)``.

    A tensor as is; a tuple or list -> its first element; a dict or a Hugging Face
    ``ModelOutput`` (a dict subclass, checked without importing `transformers`) -> its
    ``logits``. Anything else is an `ArchitectureError` naming what was returned.
    """
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping):
        value = out.get("logits")
        if isinstance(value, Tensor):
            return value
        keys = ", ".join(map(str, out.keys())) or "no keys"
        raise ArchitectureError(
            f"the model returned {type(out).__name__} without a 'logits' tensor ({keys})",
            hint="wrap the model so that forward returns the logits/outputs tensor "
            "(or a dict/ModelOutput with 'logits')",
        )
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    what = type(out).__name__
    if isinstance(out, (tuple, list)):
        what += " whose first element is " + (type(out[0]).__name__ if out else "missing")
    raise ArchitectureError(
        f"the model returned {what}, not a tensor",
        hint="forward must return the outputs tensor, a tuple/list starting with it, "
        "or a dict/ModelOutput with 'logits'",
    )


def select_params(model: nn.Module, layers: str | None = None) -> dict[str, nn.Parameter]:
    """Trainable parameters, optionally filtered by a glob on names (``'fc*'``, ``'*.weight'``).

    A glob matches a parameter if it matches its full name or its module path. Several globs
    may be separated by commas.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not layers:
        return params
    globs = [g.strip() for g in layers.split(",") if g.strip()]
    chosen = {
        n: p
        for n, p in params.items()
        if any(
            fnmatch.fnmatchcase(n, g) or fnmatch.fnmatchcase(n.rpartition(".")[0], g) for g in globs
        )
    }
    if not chosen:
        modules = sorted({n.rpartition(".")[0] for n in params})
        raise ConfigError(
            f"--layers {layers!r} matches no trainable parameter",
            hint=f"module names in this model: {', '.join(modules[:12])}"
            + (" ..." if len(modules) > 12 else ""),
        )
    return chosen


@dataclass
class Objective:
    """A model, its loss and the parameters to differentiate."""

    model: nn.Module
    loss: Loss
    params: dict[str, nn.Parameter]
    mode: str = "eval"
    seed: int = 0  # train mode: every forward pass draws its random masks from this seed

    @classmethod
    def build(
        cls,
        model: nn.Module,
        loss: Loss | str,
        layers: str | None = None,
        mode: str = "eval",
        seed: int = 0,
    ) -> Objective:
        loss = get_loss(loss) if isinstance(loss, str) else loss
        apply_mode(model, mode)
        params = select_params(model, layers)
        if not params:
            raise ConfigError("the model has no trainable parameters")
        return cls(model, loss, params, mode, seed)

    # -------------------------------------------------------------------------- evaluation
    @property
    def space(self) -> ParamSpace:
        return ParamSpace.of(self.params)

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def outputs(self, inputs: Inputs, params: Mapping[str, Tensor] | None = None) -> Tensor:
        """Model outputs (unwrapped by `output_tensor`); with `params`, those tensors replace
        the model's (functional call). In train mode the random generator is reset to
        `seed` for the call (and restored after), so Dropout draws the same masks on every
        pass over a batch (`gmcurv.modes`)."""
        if self.mode == "train":
            cuda = self.device.type == "cuda"
            devices = [self.device.index or 0] if cuda else []  # CPU state is always forked
            with torch.random.fork_rng(devices):
                torch.manual_seed(self.seed)
                return self._outputs(inputs, params)
        return self._outputs(inputs, params)

    def _outputs(self, inputs: Inputs, params: Mapping[str, Tensor] | None) -> Tensor:
        if params is None:
            out = self.model(**inputs) if isinstance(inputs, dict) else self.model(inputs)
        else:
            args = () if isinstance(inputs, dict) else (inputs,)
            kwargs = inputs if isinstance(inputs, dict) else None
            out = functional_call(self.model, dict(params), args, kwargs, strict=False)
        return output_tensor(out)

    def targets(self, batch: Batch, outputs: Tensor) -> Tensor:
        """Targets shaped and typed for the loss (defaults for next-token prediction)."""
        targets = (
            batch.targets if batch.targets is not None else self.loss.default_targets(batch.inputs)
        )
        return shape_targets(self.loss, targets, outputs)

    def per_example_loss(self, batch: Batch, params: Mapping[str, Tensor] | None = None) -> Tensor:
        """``L_n`` for each example of the batch, shape ``[n]``."""
        out = self.outputs(batch.inputs, params)
        return self.loss.per_example(out, self.targets(batch, out))

    # -------------------------------------------------------------------------- validation
    def check_data(self, data: DataSample) -> torch.Size:
        """Validate DATA against the model before any compute.

        Returns the output shape of one example.
        """
        return validate_data(self, data)


def shape_targets(loss: Loss, targets: Tensor | None, outputs: Tensor) -> Tensor:
    """Targets as `loss` takes them: class indices (int64, never truncating 6.5 to 6) for
    cross-entropy, else the outputs' dtype and shape (one target per output); a callable
    loss gets them as stored."""
    if isinstance(loss, CallableLoss):
        return targets  # as stored (or None): the user's function owns their meaning
    if targets is None:
        raise DataError("the data has no targets", hint="store them under 'targets'")
    if isinstance(loss, CrossEntropy):
        if targets.is_floating_point():
            fractional = targets != targets.round()
            if bool(fractional.any()):  # class indices: never truncate 6.5 to 6
                value = float(targets[fractional].flatten()[0])
                raise DataError(
                    f"the targets hold non-integer values (e.g. {value:g}) but the "
                    f"{loss.name} loss takes class indices",
                    hint="store integer class labels, or pass --loss mse for regression targets",
                )
            targets = targets.long()
        return targets
    targets = targets.to(outputs.dtype)
    if targets.numel() != outputs.numel():
        raise DataError(
            f"targets have shape {tuple(targets.shape)}, but the model's outputs have shape "
            f"{tuple(outputs.shape)}: the loss {loss.name} needs one target per output",
            hint="class labels want --loss cross_entropy",
        )
    return targets.reshape(outputs.shape) if targets.shape != outputs.shape else targets


def validate_data(objective: Objective, data: DataSample) -> torch.Size:
    """Validate DATA against the model before any compute: the model takes the inputs with
    finite outputs, and every file's targets fit the loss. Returns one example's output shape.
    """
    data.validate()
    probe = data.first(2, objective.device, objective.dtype)
    try:
        with torch.no_grad():
            out = objective.outputs(probe.inputs)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        shape = (
            {k: tuple(v.shape[1:]) for k, v in probe.inputs.items()}
            if isinstance(probe.inputs, dict)
            else tuple(probe.inputs.shape[1:])
        )
        raise DataError(
            f"{data.path}: the model cannot take these inputs (one example has shape "
            f"{shape}): {str(e).splitlines()[0]}",
            hint="check that the data belongs to this model",
        ) from None
    if not torch.isfinite(out).all():
        raise DataError(
            f"{data.path}: the model's outputs contain NaN/Inf on the first examples",
            hint="check the checkpoint and the input scaling",
        )
    per_example = out.shape[1:]
    for shard, inputs, targets in data.shard_arrays():
        n = batch_size_of(inputs)
        batch = Batch(inputs, targets, 0)
        try:
            tgt = objective.targets(batch, out.new_empty((n, *per_example)))
        except DataError as e:
            raise DataError(f"{shard.path}: {e.message}", e.hint) from None
        objective.loss.check(torch.Size((n, *per_example)), tgt, str(shard.path))
    return per_example


def labels_are_input_ids(data: DataSample) -> bool:
    """Whether the first file's targets equal its integer inputs (``input_ids``): the Hugging
    Face causal-LM convention ``labels = input_ids``, where the shift happens in the loss."""
    for _, inputs, targets in data.shard_arrays():
        ids = inputs.get("input_ids") if isinstance(inputs, dict) else inputs
        return (
            targets is not None
            and ids is not None
            and not ids.is_floating_point()
            and ids.shape == targets.shape
            and ids.ndim >= 2
            and bool(torch.equal(ids, targets))
        )
    return False


def refuse_unnamed_label_shift(data: DataSample, loss_named: bool, label: str) -> None:
    """Refuse data whose labels equal its input ids (the Hugging Face causal-LM convention)
    when nothing named the loss: the default cross_entropy would score every token against
    itself. `label` names the data in the message."""
    if loss_named or not labels_are_input_ids(data):
        return
    raise ConfigError(
        f"{label}: the labels equal the input ids (the Hugging Face causal-LM "
        "convention) but nothing names the loss, and the default cross_entropy "
        "would score every token against itself",
        hint="pass --loss next_token (labels shifted by one inside the loss, as "
        "transformers does), or --loss cross_entropy if the outputs are already "
        "aligned with the labels",
    )


def trainable_modules(model: nn.Module, params: Mapping[str, Tensor]) -> dict[str, nn.Module]:
    """Modules owning at least one selected parameter directly, by module path."""
    owned = {id(p) for p in params.values()}
    return {
        name: m
        for name, m in model.named_modules(remove_duplicate=False)
        if any(id(p) in owned for p in m.parameters(recurse=False))
    }
