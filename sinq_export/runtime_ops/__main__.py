"""``python -m sinq_export.runtime_ops build [--force] [--cuda yes|no|auto] | info``."""

from __future__ import annotations

import argparse
import sys

from . import (
    RuntimeOpsUnavailable,
    build,
    cuda_provider_available,
    is_available,
    library_path,
    session_options,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sinq_export.runtime_ops")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="compile the custom-op library into the package folder")
    b.add_argument("--force", action="store_true")
    b.add_argument("--cuda", choices=("auto", "yes", "no"), default="auto")
    sub.add_parser("info", help="where the library is and whether it loads")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build":
            cuda = {"auto": None, "yes": True, "no": False}[args.cuda]
            print(build(force=args.force, cuda=cuda))
        else:
            for cuda in (False, True):
                if is_available(cuda=cuda):
                    session_options(cuda=cuda)
                    print(f"{'cuda' if cuda else 'cpu '}: {library_path(cuda=cuda)} (loads)")
                else:
                    print(f"{'cuda' if cuda else 'cpu '}: not built")
            print(f"CUDAExecutionProvider available: {cuda_provider_available()}")
    except RuntimeOpsUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
