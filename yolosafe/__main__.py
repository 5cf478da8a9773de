"""``python -m yolosafe``: the same command line as ``yolosafe``."""

from yolosafe.cli.main import main

if __name__ == "__main__":
    main()
