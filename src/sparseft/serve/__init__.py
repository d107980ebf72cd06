"""`sparseft serve`: an OpenAI-compatible HTTP server on the sparse CPU runtime with continuous batching.

`engine` batches requests on the runtime's own decoder, `app` is the HTTP API (FastAPI), `serve` loads a model
and runs both under uvicorn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sparseft.errors import SparseftError

SHUTDOWN_SECONDS = 30  # on SIGTERM, running requests get this long to finish before they are ended


def _needs() -> None:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise SparseftError(
            f"sparseft serve needs {e.name}: pip install 'sparseft[serve]' (fastapi, uvicorn, prometheus-client)"
        ) from e


def load_engine(
    model: str | Path,
    values: str | None = None,
    head_values: str = "bf16",
    max_batch: int = 8,
    max_queue: int = 64,
    context: int | None = None,
    prefill_chunk: int = 256,
    trust_remote_code: bool = False,
) -> Any:
    """An engine (not started) for the model directory `model` on the runtime's own decoder. `context`: tokens
    per request (prompt and completion), by default the model's own limit up to 2048."""
    from sparseft import runtime
    from sparseft.hf import load_tokenizer
    from sparseft.runtime.models import LlamaDecoder
    from sparseft.serve.engine import Engine

    tokenizer = load_tokenizer(str(model), trust_remote_code)
    net = runtime.load(model, values, head_values=head_values, decoder="sparseft")  # type: ignore[arg-type]
    if not isinstance(net, LlamaDecoder):
        raise SparseftError(
            f"sparseft serve runs the Llama family (Llama, Mistral, Qwen2/3, Phi-3) on sparseft's own decoder; "
            f"{model} is {getattr(net.config, 'model_type', 'another architecture')} (use sparseft generate)"
        )
    limit = int(getattr(net.config, "max_position_embeddings", 0) or 2048)
    if context is None:
        context = min(limit, 2048)
    elif context > limit:
        raise SparseftError(f"--context {context} is past the model's {limit} positions")
    return Engine(net, tokenizer, max_batch, context, max_queue, prefill_chunk)


def serve(
    model: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    name: str | None = None,
    log_level: str = "info",
    **engine_options: Any,
) -> None:
    """Load `model` and serve it until SIGINT or SIGTERM: then take no new requests, let the running ones finish
    (up to SHUTDOWN_SECONDS) and exit."""
    _needs()
    import uvicorn

    from sparseft.serve.app import create_app

    if not Path(model).is_dir():
        raise SparseftError(
            f"{model} is not a directory; give an export of sparseft export or a pruned HF checkpoint"
        )
    engine = load_engine(model, **engine_options)
    name = name or Path(model).resolve().name
    app = create_app(engine, name, api_key)
    cache_mb = sum(k.numel() * k.element_size() * 2 for k in engine.cache.keys) / 1e6
    print(
        f"sparseft serve: {name} on http://{host}:{port}/v1 ({engine.model.decoder_name}; {engine.cache.slots} slots "
        f"x {engine.context} tokens, KV cache {cache_mb:.0f} MB)",
        flush=True,
    )

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:  # SIGTERM/SIGINT: refuse new work at once
            engine.drain()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=SHUTDOWN_SECONDS
    )
    Server(config).run()
