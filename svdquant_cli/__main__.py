"""``python -m svdquant_cli``: the ``svdquant`` command."""

from svdquant_cli import main

if __name__ == "__main__":
    raise SystemExit(main())
