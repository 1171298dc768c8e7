#!/usr/bin/env python3
"""A tiny static server on 127.0.0.1 for the browser pages (standard library only).

    python js/serve.py OUT_DIR [--model NAME=DIR ...] [--port 8000]

serves the repository at ``/`` (the pages in ``samples/web/`` and ``js/``, onnxruntime-web from
``js/node_modules``), each export folder at ``/models/NAME/`` (``OUT_DIR`` is ``default``) and,
for the validator, a job folder at ``/job/`` that pages may also write results into (PUT).
Every response carries the cross-origin isolation headers (COOP ``same-origin``, COEP
``require-corp``): without them a page has no SharedArrayBuffer and onnxruntime-web's WASM
backend runs on one thread. ``http://127.0.0.1`` is a secure context, which WebGPU needs.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import posixpath
import threading
import urllib.parse
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ISOLATION_HEADERS = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-store",
}
TYPES = {".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm",
         ".json": "application/json", ".onnx": "application/octet-stream"}


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files from the mounted folders; PUT into the writable one."""

    mounts: Mapping[str, Path] = {}
    writable: str | None = None
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, **TYPES}

    def translate_path(self, path: str) -> str:
        parts = [p for p in posixpath.normpath(urllib.parse.unquote(
            urllib.parse.urlsplit(path).path)).split("/") if p and p not in (".", "..")]
        for prefix in sorted(self.mounts, key=len, reverse=True):
            head = [p for p in prefix.split("/") if p]
            if parts[:len(head)] == head:
                return str(self.mounts[prefix].joinpath(*parts[len(head):]))
        return str(REPO.joinpath("__not_served__"))

    def end_headers(self) -> None:
        for key, value in ISOLATION_HEADERS.items():
            self.send_header(key, value)
        super().end_headers()

    def do_PUT(self) -> None:  # noqa: N802 (http.server's naming)
        target = Path(self.translate_path(self.path))
        root = self.mounts.get(self.writable or "")
        if root is None or root.resolve() not in target.resolve().parents:
            self.send_error(403, "not writable")
            return
        length = int(self.headers.get("Content-Length", 0))
        with open(target, "wb") as fh:
            remaining = length
            while remaining:
                chunk = self.rfile.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                fh.write(chunk)
                remaining -= len(chunk)
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # quiet: the pages report what matters


def start(models: Mapping[str, Path], job: Path | None = None, port: int = 0,
          ) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Serve in a background thread; returns the server and its base URL."""
    mounts: dict[str, Path] = {"/": REPO}
    mounts.update({f"/models/{name}": Path(folder).resolve() for name, folder in models.items()})
    if job is not None:
        mounts["/job"] = Path(job).resolve()
    handler = type("Handler", (_Handler,), {"mounts": mounts,
                                            "writable": "/job" if job is not None else None})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port),
                                             functools.partial(handler, directory=str(REPO)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", help="a `sinq-export model` folder, served as /models/default/")
    ap.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                    help="another folder to serve as /models/NAME/ (e.g. the genai builder's)")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args(argv)
    models = {"default": Path(args.out_dir)}
    for spec in args.model:
        name, _, folder = spec.partition("=")
        if not name or not folder:
            ap.error(f"--model {spec!r}: expected NAME=DIR")
        models[name] = Path(folder)
    for name, folder in models.items():
        if not folder.is_dir():
            ap.error(f"{folder}: not a folder ({name})")
    server, url = start(models, port=args.port)
    print(f"serving {', '.join(f'{n}={f}' for n, f in models.items())}; "
          f"open {url}/samples/web/ (Ctrl-C stops)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
