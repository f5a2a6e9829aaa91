"""``ptv2-serve`` / ``python -m ptv2_kernels.serving``: load a model and task checkpoints, serve them over HTTP
(FastAPI + uvicorn, the ``[serve]`` extra), or with ``--replicas N`` as N Ray Serve replicas (the ``[ray]`` extra).

SIGTERM or SIGINT shut down gracefully: ``/ready`` turns 503, no new connections are accepted, the in-flight
requests are answered, the batcher drains, and the process exits 0."""

import signal
import sys
from typing import List, Optional

from .options import build_server, http_settings, parser


def _exit_zero(signum, frame):
    """SIGTERM after the graceful shutdown (uvicorn re-raises the signal it handled): exit 0."""
    raise SystemExit(0)


def main(argv: Optional[List[str]] = None) -> int:
    """Serve until SIGTERM/SIGINT; prints ``serving on http://HOST:PORT`` once the port is bound."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    if args.replicas:
        from .ray import serve_replicas

        return serve_replicas(argv, args)
    try:
        from .http import HTTPServer, create_app
    except ImportError as error:
        print(f"ptv2-serve: error: {error}", file=sys.stderr)
        return 2
    try:
        engine = build_server(args)
        app = create_app(engine, http_settings(args))
    except (ValueError, TypeError, RuntimeError, OSError) as error:
        print(f"ptv2-serve: error: {error}", file=sys.stderr)
        return 2

    def started(host, port):
        print(f"serving on http://{host}:{port} tasks={engine.tasks()} packed={engine.packed}", flush=True)

    server = HTTPServer(app, args.host, args.port, timeout_s=args.request_timeout_s,
                        log_level="info" if args.verbose else "warning", access_log=args.verbose, on_started=started)
    signal.signal(signal.SIGTERM, _exit_zero)
    try:
        server.run()
    except KeyboardInterrupt:  # SIGINT re-raised after the graceful shutdown
        pass
    finally:
        engine.close()
    return 0 if server.started else 1
