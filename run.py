"""`python run.py ...` in a clone: the `lmstack` command (src/lmstack/cli.py), which a
`pip install` also puts on PATH as `lmstack`."""

from lmstack.cli import main

if __name__ == "__main__":
    main()
