"""``python -m gmcurv`` (also ``torchrun -m gmcurv``) and the ``gmcurv`` console script.

`main` runs before anything heavy is imported: Ctrl-C during start-up exits 130 quietly
(`gmcurv.cli.signals`) and the cyclic garbage collector stays off until the command's
start-up is over; at the end the process exits without the interpreter's teardown
(`gmcurv.cli.startup`).
"""


def main() -> None:
    """The process entry: signals and the start-up collector policy, then the app."""
    from gmcurv.cli import signals, startup

    startup.hold()  # before the heavy imports (typer, rich, then torch in the command)
    signals.install()
    from gmcurv.cli.app import app

    startup.run_then_exit(app)  # and skip the interpreter's teardown


if __name__ == "__main__":
    main()
