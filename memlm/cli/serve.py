"""`memlm serve`: an OpenAI-compatible completions server with sessions (memlm.serve)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro

from memlm.cli.common import RunPath, UsageError
from memlm.cli.evaluate import attach_memory
from memlm.device import pick_device
from memlm.train import load_model, load_tokenizer


@dataclass
class ServeCommand:
    path: RunPath
    """Run directory (its checkpoints/latest) or checkpoint directory."""
    memory: str | None = None
    """Knowledge memory directory (memlm memorize), read by every session's kNN layers."""
    memory_mode: Literal["fill", "add", "replace"] = "fill"
    """How the kNN layers read the knowledge memory (see memlm generate --help)."""
    host: str = "127.0.0.1"
    """Address to listen on (0.0.0.0: every interface)."""
    port: int = 8000
    """Port to listen on."""
    max_sessions: int = 64
    """Sessions kept at once; past it the least recently used is evicted."""
    max_session_mb: float = 1024.0
    """Memory (MB) all sessions' states may hold together; past it the least recently used are evicted."""
    max_tokens: int = 2048
    """Largest max_tokens a request may ask for."""
    max_batch: int = 64
    """Requests decoded at once (those at one stream position share a forward)."""
    gather_ms: float = 2.0
    """An idle server that receives a request waits this long for others to start with it."""
    device: str = "auto"
    """Device: auto, cpu, cuda, cuda:N."""
    decode: Literal["auto", "eager", "static"] = "auto"
    """eager: the forward, requests at one stream position batched; static: static-cache decoders
    (a CUDA graph a step on CUDA), requests at one stream position as the rows of one; auto:
    static on CUDA for models with recurrent memory that memlm generate decodes that way, else eager."""


def run(argv: list[str]) -> int:
    args = tyro.cli(ServeCommand, args=argv, prog="memlm serve",
                    description="Serve a trained model: OpenAI-compatible /v1/completions with sessions that keep "
                                "their memory between requests.")
    if args.max_sessions < 1 or args.max_session_mb <= 0 or args.max_tokens < 1 or args.max_batch < 1:
        raise UsageError("--max-sessions, --max-session-mb, --max-tokens and --max-batch must be positive")
    if not 0 <= args.gather_ms <= 1000:
        raise UsageError(f"--gather-ms must lie in [0, 1000], got {args.gather_ms}")
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port must lie in 0..65535, got {args.port}")
    try:
        import uvicorn

        from memlm.serve.app import create_app
    except ImportError as missing:
        raise UsageError(f"memlm serve needs the serve extra (pip install 'memlm[serve]'): {missing}")
    from memlm.serve.engine import Engine
    from memlm.serve.sessions import SessionStore

    device = pick_device(args.device)
    model, saved = load_model(args.path, device)
    attach_memory(model, args.memory, device, args.memory_mode)
    try:
        engine = Engine(model, device, saved["train"].get("precision", "auto"), load_tokenizer(args.path, saved),
                        max_batch=args.max_batch, gather_ms=args.gather_ms, decode=args.decode)
    except ValueError as error:  # --decode static for a model it cannot serve
        raise UsageError(str(error))
    sessions = SessionStore(args.max_sessions, int(args.max_session_mb * 2 ** 20))
    app = create_app(engine, sessions, model_name=Path(args.path).name or "memlm", max_tokens=args.max_tokens)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
