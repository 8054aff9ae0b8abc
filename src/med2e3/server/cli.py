"""``med2e3 serve``: the web app and REST API over one model folder."""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from med2e3.errors import ConfigError, Med2E3Error
from med2e3.server.settings import MB, ServerSettings, check_bind

if TYPE_CHECKING:
    from med2e3.inference import Med2E3Predictor

TOKEN_ENV = "MED2E3_TOKEN"


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand to the ``med2e3`` CLI's subparsers."""
    help = "start the local web app and REST API for a model"
    p = subparsers.add_parser(
        "serve",
        help=help,
        description="Start a local web app (upload a CT volume, browse slices, ask questions, see the "
        "TG-IS slice weights) and its REST API (schema at /api/openapi.json). Listens on 127.0.0.1 "
        "unless --host says otherwise; any other address requires a token.",
        epilog="example: med2e3 serve --model runs/demo/finetune --port 8000\n"
        f"on a network: {TOKEN_ENV}=$(python -c 'import secrets; print(secrets.token_hex(16))') "
        "med2e3 serve --model runs/demo/finetune --host 0.0.0.0",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="a med2e3 model folder (e.g. runs/demo/finetune)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        help=f"require 'Authorization: Bearer TOKEN' on every request (default: ${TOKEN_ENV}); "
        "required for a non-loopback --host",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--threads", type=int, help="PyTorch CPU threads (default: PyTorch's choice)")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="encoders and TG-IS replayed from CUDA graphs (recorded at start), static KV cache + compiled "
        "decoding: the first question compiles (~30 s at paper size), later ones decode ~7x faster "
        "(default: on with CUDA, off on CPU)",
    )
    p.add_argument(
        "--window",
        help="CT window the model sees: abdomen, lung, bone, brain, minmax (default: the model's own)",
    )
    p.add_argument(
        "--orientation",
        choices=["axial", "acquisition"],
        help="how uploads are read: axial slices or the scan's own slice axis (default: the model's own)",
    )
    p.add_argument("--max-upload-mb", type=float, default=512, help="largest upload (default 512)")
    p.add_argument(
        "--max-volume-mb",
        type=float,
        help="refuse (413) a volume whose voxels need more memory than this, from its header (default 1024)",
    )
    p.add_argument("--ttl", type=float, default=3600, help="seconds an unused upload is kept (default 3600)")
    p.add_argument(
        "--max-waiting", type=int, default=4, help="model requests that may wait; more get 503 (default 4)"
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=8,
        help="most waiting questions answered together in one batched generation; 1: one at a time (default 8)",
    )
    p.add_argument(
        "--max-loaded",
        type=int,
        default=4,
        help="encoded volumes kept in memory; others are encoded again (default 4)",
    )
    p.add_argument(
        "--timeout", type=float, default=300, help="seconds a model request may take (default 300)"
    )
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit (default 64)")
    p.add_argument("--report-max-new-tokens", type=int, default=256, help="report length limit (default 256)")
    p.add_argument(
        "--upload-dir", type=Path, help="where to keep uploads (a private temporary folder is made in it)"
    )
    p.set_defaults(handler=serve)
    return p


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """`ServerSettings` from parsed ``serve`` arguments."""
    return ServerSettings(
        token=args.token or None,
        max_upload_bytes=int(args.max_upload_mb * MB),
        ttl_s=args.ttl,
        sweep_interval_s=min(60.0, max(1.0, args.ttl / 4)),
        max_waiting=args.max_waiting,
        max_batch=args.max_batch,
        max_loaded=args.max_loaded,
        request_timeout_s=args.timeout,
        max_new_tokens=args.max_new_tokens,
        report_max_new_tokens=args.report_max_new_tokens,
        upload_dir=args.upload_dir,
    )


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket (so a busy port is a one-line error, and port 0 picks a free one)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(128)
    except OSError as err:
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


class _HideToken(logging.Filter):
    """Keep '?token=...' out of the access log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                re.sub(r"token=[^&\s]*", "token=***", a) if isinstance(a, str) else a for a in record.args
            )
        return True


def check_args(args: argparse.Namespace) -> ServerSettings:
    """Everything about ``serve`` arguments that can be refused before loading the model."""
    from med2e3.data.io import WINDOWS
    from med2e3.folders import check_model_folder

    check_bind(args.host, args.token)
    if args.window is not None and args.window not in WINDOWS:
        raise ConfigError(f"--window: unknown window {args.window!r}; valid names: {', '.join(WINDOWS)}")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads: must be at least 1, got {args.threads}")
    settings = settings_from_args(args)
    check_model_folder(args.model)
    return settings


def load_predictor(args: argparse.Namespace) -> Med2E3Predictor:
    """The predictor ``serve`` answers with: the model's own preprocessing unless a flag overrides it."""
    import torch

    from med2e3.inference import Med2E3Predictor  # noqa: F811 (the runtime import)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    compile = device.type == "cuda" if args.compile is None else args.compile
    return Med2E3Predictor.from_pretrained(
        args.model,
        device=device,
        window=args.window,
        orientation=args.orientation,
        compile=compile,
        max_volume_bytes=None if args.max_volume_mb is None else int(args.max_volume_mb * MB),
    )


def serve(args: argparse.Namespace) -> int:
    """Handler of ``med2e3 serve``."""
    try:
        import uvicorn

        from med2e3.server.app import create_app, model_name_of
    except ImportError as err:
        raise Med2E3Error(f"the server needs {err.name}: pip install 'med2e3[server]'") from None
    import torch

    settings = check_args(args)
    sock = listen(args.host, args.port)
    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        predictor = load_predictor(args)
        app = create_app(predictor, settings, model_name=model_name_of(args.model))
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        query = "/?token=" + settings.token if settings.token else "/"
        print(f"med2e3 serve: http://{shown}:{port}{query}  (model {args.model}; Ctrl+C stops)", flush=True)
        logging.getLogger("uvicorn.access").addFilter(_HideToken())
        uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5)).run(sockets=[sock])
    finally:
        sock.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m med2e3.server ...``: the same as ``med2e3 serve ...``."""
    parser = argparse.ArgumentParser(prog="python -m med2e3.server")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    try:
        return serve(args)
    except Med2E3Error as err:
        print(f"med2e3: error: {err}", file=sys.stderr)
        return 2
