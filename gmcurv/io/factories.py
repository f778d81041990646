"""User code named on the command line: ``--arch`` and ``--loss`` factories.

``path/to/file.py:name`` or ``package.module:name`` is imported only because the user named
it (never because a checkpoint's metadata does, see `gmcurv.io.metadata`).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from gmcurv.errors import ArchitectureError
from gmcurv.losses import LOSSES, CallableLoss, Loss, get_loss
from gmcurv.models.registry import FAMILIES


def import_factory(
    spec: str,
    option: str = "--arch",
    returns: str = "an nn.Module",
    usage: str = "use mlp:<activation>, path/to/model.py:factory or package.module:factory",
) -> Callable[..., Any]:
    """Resolve ``path/to/file.py:name`` or ``package.module:name`` to a callable.

    `option`, `returns` and `usage` only shape the error messages (``--arch``, ``--loss``).
    """
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise ArchitectureError(
            f"{option} {spec!r} is neither a built-in name nor a factory", hint=usage
        )
    is_file = target.endswith(".py") or "/" in target or "\\" in target
    try:
        if is_file:
            file = Path(target).expanduser()
            if not file.is_file():
                raise ArchitectureError(
                    f"{option} {spec!r}: file {file} not found", hint="check the path"
                )
            mod_name = f"gmcurv_user_{abs(hash(str(file.resolve())))}"
            module_spec = importlib.util.spec_from_file_location(mod_name, file)
            if module_spec is None or module_spec.loader is None:
                raise ArchitectureError(f"{option} {spec!r}: cannot import {file}")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[mod_name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ArchitectureError:
        raise
    except Exception as e:
        raise ArchitectureError(
            f"{option} {spec!r}: importing {target} failed: {type(e).__name__}: {e}",
            hint="fix the error in that module (run it with python to see the traceback)",
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ArchitectureError(
            f"{option} {spec!r}: {target} has no callable {attr!r}",
            hint=f"name a function or class in that module that returns {returns}",
        )
    return factory


def build_from_factory(spec: str) -> nn.Module:
    """Call a user factory and check that it returns an ``nn.Module``."""
    factory = import_factory(spec)
    try:
        model = factory()
    except Exception as e:
        raise ArchitectureError(
            f"--arch {spec!r}: the factory raised {type(e).__name__}: {e}",
            hint="the factory is called with no arguments and must return an nn.Module",
        ) from None
    if not isinstance(model, nn.Module):
        raise ArchitectureError(
            f"--arch {spec!r}: the factory returned {type(model).__name__}, not an nn.Module",
            hint="return the model instance from the factory",
        )
    return model


def is_family_spec(spec: str) -> bool:
    """``mlp``, ``mlp:tanh`` (a registered family), or any bare name (reported as unknown)."""
    head, sep, _ = spec.partition(":")
    return head in FAMILIES or (not sep and not spec.endswith(".py") and "/" not in spec)


def load_loss(name: str) -> Loss:
    """A built-in loss by name, or a user's ``path/to/file.py:fn`` / ``package.module:fn``
    (``fn(outputs, targets) -> [N]`` per-example losses, wrapped in `CallableLoss`)."""
    if name in LOSSES or ":" not in name:
        return get_loss(name)
    fn = import_factory(
        name,
        option="--loss",
        returns="per-example losses",
        usage="use path/to/file.py:fn or package.module:fn, fn(outputs, targets) -> [N]",
    )
    return CallableLoss(name=name, fn=fn)
