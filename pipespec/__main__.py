"""``python -m pipespec`` and the ``pipespec`` command.

Ctrl-C at any moment ends with one line on stderr and exit code 130, no traceback: while the CLI's own imports run
(click, asyncio: the first few hundred milliseconds), this guard answers it; from then on ``pipespec.cli._Group``
does. Only a SIGINT before Python runs this file (the interpreter's own start-up) ends the process by the signal.
"""

import sys


def run() -> None:
    try:
        from .cli import main
    except KeyboardInterrupt:
        sys.stderr.write("pipespec: interrupted\n")
        sys.exit(130)
    main()


if __name__ == "__main__":
    run()
