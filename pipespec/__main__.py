"""``python -m pipespec``: the same command as the ``pipespec`` console script (``pipespec.cli:main``, which also
answers a Ctrl-C that arrives while its own imports run)."""

from .cli import main

if __name__ == "__main__":
    main()
