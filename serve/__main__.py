"""``python -m serve --models models/``: start the service without masml installed.

Why options become environment variables: uvicorn's worker processes import the app afresh, and the
environment is what they all inherit.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m serve", description="masml scoring service")
    p.add_argument(
        "--models",
        default=os.environ.get("MASML_SERVE_MODELS", "models"),
        help="folder of bundles (one sub-folder per model)",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address; anything but loopback needs API keys")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument(
        "--api-keys-file",
        default=os.environ.get("MASML_SERVE_API_KEYS_FILE"),
        help="lines 'KEY [user|admin]' or 'sha256:HEX [user|admin]'; or set MASML_SERVE_API_KEYS",
    )
    p.add_argument(
        "--audit-log",
        default=os.environ.get("MASML_SERVE_AUDIT_LOG"),
        help="audit log file (JSON lines); default: stderr",
    )
    p.add_argument("--max-batch", type=int, default=int(os.environ.get("MASML_SERVE_MAX_BATCH", "5000")))
    p.add_argument(
        "--max-explain-batch",
        type=int,
        default=int(os.environ.get("MASML_SERVE_MAX_EXPLAIN_BATCH", "100")),
        help="patients per explain call (an explanation takes ~2 MB per patient while computed)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=int(os.environ.get("MASML_SERVE_MAX_BODY_BYTES", str(8 * 1024 * 1024))),
    )
    p.add_argument(
        "--public-metrics",
        action="store_true",
        default=os.environ.get("MASML_SERVE_PUBLIC_METRICS", "").lower() in ("1", "true", "yes"),
        help="answer /metrics without an API key (counts and histograms only, no patient data), so a "
        "plain Prometheus scrape works",
    )
    p.add_argument("--log-level", default="info")
    a = p.parse_args(argv)
    env = {
        "MASML_SERVE_MODELS": a.models,
        "MASML_SERVE_HOST": a.host,
        "MASML_SERVE_MAX_BATCH": str(a.max_batch),
        "MASML_SERVE_MAX_EXPLAIN_BATCH": str(a.max_explain_batch),
        "MASML_SERVE_MAX_BODY_BYTES": str(a.max_body_bytes),
        "MASML_SERVE_PUBLIC_METRICS": "1" if a.public_metrics else "",
    }
    if a.api_keys_file:
        env["MASML_SERVE_API_KEYS_FILE"] = a.api_keys_file
    if a.audit_log:
        env["MASML_SERVE_AUDIT_LOG"] = a.audit_log
    if a.workers > 1 and "MASML_SERVE_RELOAD_FILE" not in os.environ:
        fd, path = tempfile.mkstemp(prefix="masml-serve-reload-")
        os.close(fd)
        env["MASML_SERVE_RELOAD_FILE"] = path
    os.environ.update(env)

    import uvicorn

    from serve.app import app_from_env

    if a.workers == 1:  # build the app here, so a refusal (no keys off loopback) exits before binding
        try:
            app = app_from_env()
        except SystemExit as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        uvicorn.run(
            app, host=a.host, port=a.port, log_level=a.log_level, access_log=False, loop="auto", http="auto"
        )
    else:
        uvicorn.run(
            "serve.app:app_from_env",
            factory=True,
            host=a.host,
            port=a.port,
            workers=a.workers,
            log_level=a.log_level,
            access_log=False,
            loop="auto",
            http="auto",
        )


if __name__ == "__main__":
    main()
