"""``python -m gmcurv`` (also ``torchrun -m gmcurv``) runs the command line."""

from gmcurv.cli.app import main

if __name__ == "__main__":
    main()
