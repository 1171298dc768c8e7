"""The `sinq-export` console entry point.

It imports nothing heavy itself (`import sinq_export` is lazy), so a Ctrl-C in the seconds
that torch, transformers and onnxruntime take to import, before `cli.main` installs its
signal handling, is one line and exit 130 instead of a KeyboardInterrupt traceback.
"""

from __future__ import annotations

import sys

EXIT_SIGINT = 130  # outcome.EXIT_SIGINT, without importing it


def main() -> int:
    try:
        from .cli import main as run_cli

        return run_cli()
    except KeyboardInterrupt:  # cli.main handles its own; this is one before it started
        print("sinq-export: interrupted by SIGINT while starting; nothing was written",
              file=sys.stderr)
        return EXIT_SIGINT


if __name__ == "__main__":
    sys.exit(main())
