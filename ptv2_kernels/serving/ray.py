"""Scale-out on Ray Serve (the ``[ray]`` extra): N replicas of the engine behind Ray Serve's HTTP proxy and router.

Every replica builds the same server from the same ``ptv2-serve`` arguments (model, banks, tasks, limits), so the
paths must be readable on every node (a shared filesystem or object-store mount; or a hub model name), and serves
the same FastAPI app (:func:`~ptv2_kernels.serving.http.create_app`): clients see one server at Ray's proxy.
Ray's router spreads the requests over the replicas (``max_ongoing_requests`` each); inside a replica the engine
batches them as usual, with its own queue bound (429). Ray restarts a replica whose health check fails.

Three ways to run it:
- ``ptv2-serve --replicas N [--ray-address auto] --model ... --bank ...``: starts (or joins) Ray, deploys, prints
  ``serving on http://HOST:PORT``, serves until SIGTERM/SIGINT, then shuts the replicas down gracefully;
- ``serve run ptv2_kernels.serving.ray:build_app argv="--model ... --bank ..." replicas=4``, or a Serve config
  file (``serve deploy``) whose application has ``import_path: ptv2_kernels.serving.ray:build_app`` and
  ``args: {argv: "...", replicas: 4}``;
- :func:`deployment` from Python (``serve.run(deployment(argv, 4))``).
"""

import shlex
import signal
import threading
from typing import List, Optional, Sequence

try:
    import ray
    from ray import serve
except ImportError as missing:  # pragma: no cover  (the optional extra is not installed)
    raise ImportError(f"ptv2_kernels.serving.ray needs the [ray] extra: pip install 'ptv2_kernels[ray]' ({missing})") \
        from missing

from .options import build_server, http_settings, parser  # noqa: E402  (after the [ray] extra's check)

APP_NAME = "ptv2"
RAY_FLAGS = ("--replicas", "--ray-address")


@serve.deployment(name="ptv2-prefix-server")
@serve.ingress()
class PrefixDeployment:
    """One replica: the engine of ``argv`` (``ptv2-serve`` arguments) and its HTTP app; ``api_keys`` (if given)
    replace the keys of ``argv``/the environment (the driver resolves them once for every replica)."""

    def __init__(self, argv: List[str], api_keys: Optional[Sequence[str]] = None):
        import dataclasses

        args = parser().parse_args(list(argv))
        self.engine = build_server(args)
        self.settings = http_settings(args)
        if api_keys is not None:
            self.settings = dataclasses.replace(self.settings, api_keys=tuple(api_keys))

    def __serve_build_asgi_app__(self):
        from .http import create_app

        return create_app(self.engine, self.settings)

    def check_health(self) -> None:
        """Ray Serve's periodic health check: the engine must still accept requests."""
        if self.engine._closed:
            raise RuntimeError("the engine of this replica is closed")


def deployment(argv: Sequence[str], replicas: int, *, api_keys: Optional[Sequence[str]] = None,
               ray_actor_options: Optional[dict] = None, max_ongoing_requests: Optional[int] = None):
    """The Ray Serve application of ``replicas`` replicas built from the ``ptv2-serve`` arguments ``argv``
    (``ray_actor_options``: e.g. ``{"num_gpus": 1}`` or ``{"num_cpus": 4}`` per replica)."""
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas must be an int >= 1, got {replicas!r}")
    options = {"num_replicas": replicas}
    if ray_actor_options is not None:
        options["ray_actor_options"] = ray_actor_options
    if max_ongoing_requests is not None:
        options["max_ongoing_requests"] = max_ongoing_requests
    return PrefixDeployment.options(**options).bind(_without_ray_flags(argv), api_keys)


def build_app(args: dict):
    """Application builder for ``serve run`` / ``serve deploy``: ``args`` ``{"argv": "<ptv2-serve arguments>" (a
    string or a list), "replicas": N (default 1)}``."""
    if "argv" not in args:
        raise ValueError("build_app needs args['argv']: the ptv2-serve arguments (model, banks, tasks, limits)")
    argv = shlex.split(args["argv"]) if isinstance(args["argv"], str) else list(args["argv"])
    return deployment(argv, int(args.get("replicas", 1)))


def _without_ray_flags(argv: Sequence[str]) -> List[str]:
    """``argv`` without ``--replicas N`` / ``--ray-address A`` (the replicas serve in-process)."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item in RAY_FLAGS:
            skip = True
        elif not item.startswith(tuple(flag + "=" for flag in RAY_FLAGS)):
            out.append(item)
    return out


def serve_replicas(argv: Sequence[str], args) -> int:
    """``ptv2-serve --replicas N``: deploy on Ray (``--ray-address``, default a local Ray), print ``serving on
    http://HOST:PORT`` when every replica is up, wait for SIGTERM/SIGINT, shut down gracefully, return 0."""
    ray.init(address=args.ray_address, include_dashboard=False)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(deployment(argv, args.replicas, api_keys=http_settings(args).api_keys), name=APP_NAME,
                  route_prefix="/")
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        print(f"serving on http://{args.host}:{args.port} replicas={args.replicas} (Ray Serve)", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
