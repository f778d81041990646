"""``python -m gmcurv`` (also ``torchrun -m gmcurv``) runs the command line."""

if __name__ == "__main__":
    from gmcurv.cli import signals

    signals.install()  # before the heavy imports: Ctrl-C during start-up exits 130 quietly
    from gmcurv.cli.app import main

    main()
