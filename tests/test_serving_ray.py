"""Ray Serve scale-out on this machine (CPU, a tiny random BERT saved to disk with a bank directory): 2 replicas
behind Ray's proxy on 127.0.0.1 answer every request as the single-process server built from the same
``ptv2-serve`` arguments does. Skipped only if ray is not installed or cannot start."""

import ptv2_kernels  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported on a CPU machine)

import asyncio
import socket
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the [ray] extra is not installed")
httpx = pytest.importorskip("httpx")

from ptv2_kernels.serving import options  # noqa: E402
from ptv2_kernels.serving.checkpoints import save_bank  # noqa: E402

from .test_serving import make_server, random_requests  # noqa: E402
from .test_serving_http import assert_same, body_of  # noqa: E402

TIMEOUT_S = 120
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_replicas_answer_like_one_process(tmp_path):
    from ray import serve

    from ptv2_kernels.serving.ray import APP_NAME, deployment

    engine, reference = make_server("bert", "ForSequenceClassification", packed=True, tasks=3)
    reference.save_pretrained(tmp_path / "model")
    save_bank(engine, tmp_path / "bank")
    argv = ["--model", str(tmp_path / "model"), "--prefix-len", "4", "--max-tasks", "4", "--bank",
            str(tmp_path / "bank"), "--replicas", "2"]
    single = options.build_server(options.parser().parse_args(argv))
    bodies = [random_requests(single.tasks(), count=1 + i % 3, seed=400 + i) for i in range(24)]
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=80 << 20,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}})
    except Exception as error:  # noqa: BLE001
        pytest.skip(f"ray cannot start here: {type(error).__name__}: {error}")
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(deployment(argv, 2, ray_actor_options={"num_cpus": 0.5}), name=APP_NAME, route_prefix="/")
        status = serve.status().applications[APP_NAME]
        replicas = [d.replica_states for d in status.deployments.values()]
        assert status.status == "RUNNING" and replicas == [{"RUNNING": 2}], status

        async def clients():
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT_S) as pool:
                ready = await pool.get("/ready")
                assert ready.status_code == 200, ready.text
                return await asyncio.gather(*(pool.post("/v1/predict", json=body_of(b)) for b in bodies))

        answers = asyncio.run(clients())
        for answer, requests in zip(answers, bodies):
            assert answer.status_code == 200, answer.text
            assert_same(answer.json(), single.predict(requests))
    finally:
        serve.shutdown()
        ray.shutdown()
        single.close()
