"""What the report says about choices made for the user: user code imported by
``--arch`` / ``--loss`` (and who named it), the architecture and loss (and why), and whether
labels are shifted (next-token prediction)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gmcurv.cli.consoles import note, stderr

if TYPE_CHECKING:
    from gmcurv.io.checkpoint import LoadedModel
    from gmcurv.objective import Objective


def record_user_code(config: dict[str, Any], quiet: bool, **specs: str | None) -> None:
    """Say which user code ``--arch``/``--loss`` import and who named it (the command
    line, an environment variable or the working directory's config file): on stderr
    (even with --quiet when a config file named it) and under ``config.code``."""
    from gmcurv.io.factories import is_family_spec

    code = []
    for option, spec in specs.items():
        if not spec or ":" not in spec or is_family_spec(spec):
            continue
        source = config.get("sources", {}).get(option, "command line")
        named_in = source
        if source == "config file":
            from gmcurv.cli.options import read_config_file

            named_in = str(read_config_file()[1])
        code.append({"option": f"--{option}", "spec": spec, "named_in": named_in})
        text = f"--{option} imports user code {spec} (named in {named_in})"
        if source == "config file":
            stderr.print(f"[yellow]note:[/yellow] {text}", soft_wrap=True)
        else:
            note(text, quiet)
    if code:
        config["code"] = code


def record_choices(
    config: dict[str, Any], loaded: LoadedModel | None, objective: Objective | None
) -> None:
    """Record in `config` the choices made for the user, with why: the architecture and
    loss (from --arch/--loss, checkpoint metadata, config.json, a family default or the
    built-in default) and whether labels are shifted (next-token prediction)."""
    sources = config.setdefault("sources", {})
    if loaded is None:
        return
    for key, value, why in (
        ("arch", loaded.arch, loaded.arch_source),
        ("loss", loaded.loss, loaded.loss_source),
    ):
        if sources.get(key, "default") == "default":
            config[key], sources[key] = value, why
    stored = [d for d in getattr(loaded, "stored_dtypes", ()) if d != config.get("dtype")]
    if stored:  # e.g. bfloat16 weights computed in float32: say so beside the dtype
        config["weights_dtype"] = ", ".join(loaded.stored_dtypes)
        how = "upcast" if "float64" not in stored else "converted"
        sources["weights_dtype"] = f"the checkpoint's; {how} to {config.get('dtype')} (--dtype)"
    if objective is not None:
        loss = objective.loss
        shift = getattr(loss, "shift", None)
        config["label_shift"] = shift
        sources["label_shift"] = (
            f"the {loss.name} loss: logits[:, :-1] against targets[:, 1:]"
            if shift
            else f"the {loss.name} loss: targets aligned with the outputs"
            if shift is not None
            else f"the {loss.name} loss decides"
        )
