"""Smoke test of an installed ptv2_kernels (a wheel or an sdist in a fresh venv), run by CI from a directory
outside the checkout with the venv's Python:

    python smoke_installed.py --kernel ahead-of-time   # the PTV2_BUILD_CPU=1 wheel (no compiler needed)
    python smoke_installed.py --kernel jit --only-kernel   # an sdist: the kernel builds from the installed sources

Checks, each with a bounded wait: the package is the installed one (not a checkout) and its version is the
metadata's; the fused CPU kernel loaded the expected way; one op call equals ``torch-ref``; ``patch_model`` on a
tiny random BERT gives the same logits as ``torch-ref`` and trains its prefix; ``ptv2-bench --quick`` ends with
its summary line; ``ptv2-serve`` (on 127.0.0.1, a free port) answers ``/health`` and one ``/v1/predict`` with the
in-process logits. Exits non-zero on the first failure.
"""

import argparse
import importlib.metadata
import json
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import torch

import ptv2_kernels
from ptv2_kernels import patch_model, prefix_attention, save_prefix, unpatch_model
from ptv2_kernels.ops.cpu_backend import cpu_kernel_status

BIN = Path(sys.executable).parent  # the venv's console scripts
PREFIX_LEN = 4
BENCH_TIMEOUT_S = 300
SERVE_START_TIMEOUT_S = 120
HTTP_TIMEOUT_S = 30
SERVE_IDS = [2, 17, 33, 5, 61, 3]  # one /v1/predict input (the tiny model has no tokenizer)


def check(condition: bool, what: str) -> None:
    if not condition:
        raise SystemExit(f"smoke: FAILED: {what}")
    print(f"smoke: ok: {what}", flush=True)


def check_installed() -> None:
    location = Path(ptv2_kernels.__file__).resolve()
    check(Path(sys.prefix).resolve() in location.parents, f"ptv2_kernels imported from the venv ({location})")
    metadata = importlib.metadata.version("ptv2_kernels")
    check(ptv2_kernels.__version__ == metadata, f"__version__ {ptv2_kernels.__version__} = metadata {metadata}")


def check_kernel(expected: str, no_compiler: bool) -> None:
    if no_compiler:
        found = [name for name in ("c++", "g++", "gcc", "cc", "clang") if shutil.which(name)]
        check(not found, f"no compiler on PATH (found: {found})")
    available, how = cpu_kernel_status()
    check(available and how.startswith({"ahead-of-time": "ahead-of-time build", "jit": "JIT build"}[expected]),
          f"fused CPU kernel loaded, {expected} ({how})")


def check_op() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 32) for _ in range(3))
    prefix_k, prefix_v = torch.randn(3, 5, 32), torch.randn(3, 5, 32)
    mask = torch.ones(2, 17, dtype=torch.bool)
    mask[1, 11:] = False
    fused = prefix_attention(q, k, v, prefix_k, prefix_v, key_padding_mask=mask)
    reference = prefix_attention(q, k, v, prefix_k, prefix_v, key_padding_mask=mask, backend="torch-ref")
    error = (fused - reference)[mask[:, None, :, None].expand_as(fused)].abs().max().item()
    check(error < 1e-5, f"prefix_attention equals torch-ref (max error {error:.1e})")


def tiny_bert():
    import transformers

    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, max_position_embeddings=64, num_labels=3)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval()


def check_patch_model(workdir: Path) -> list:
    """Patches a tiny random BERT, checks it, saves it and its prefix for the server; returns the logits of
    :data:`SERVE_IDS` (what the server must answer)."""
    model = tiny_bert()
    encoder = patch_model(model, PREFIX_LEN)
    torch.manual_seed(1)
    with torch.no_grad():
        encoder.prefix.normal_(0, 0.5)
    ids = torch.randint(1, 99, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    fused = model(input_ids=ids, attention_mask=mask).logits
    reference_model = tiny_bert()
    patch_model(reference_model, PREFIX_LEN, backend="torch-ref").load_state_dict(encoder.state_dict())
    reference = reference_model(input_ids=ids, attention_mask=mask).logits
    error = (fused - reference).abs().max().item()
    check(torch.isfinite(fused).all().item() and error < 1e-5,
          f"patch_model on a tiny BERT: logits equal torch-ref's (max error {error:.1e})")
    model.train()
    model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    check(encoder.prefix.grad is not None and encoder.prefix.grad.abs().sum().item() > 0,
          "patch_model: the prefix gets a gradient")
    model.eval()
    with torch.no_grad():
        served = model(input_ids=torch.tensor([SERVE_IDS])).logits[0].tolist()
    save_prefix(encoder, workdir / "task.safetensors")
    unpatch_model(model)
    model.save_pretrained(workdir / "model")
    return served


def check_bench() -> None:
    result = subprocess.run([str(BIN / "ptv2-bench"), "--quick"], capture_output=True, text=True,
                            timeout=BENCH_TIMEOUT_S)
    lines = result.stdout.strip().splitlines()
    check(result.returncode == 0 and lines and lines[-1].startswith("fused/concat: time "),
          f"ptv2-bench --quick ends with its summary line ({lines[-1] if lines else result.stderr[-2000:]!r})")


def _read_line(process: subprocess.Popen, timeout_s: float) -> str:
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    if not selector.select(timeout_s):
        return ""
    return process.stdout.readline()


def _http(url: str, body=None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
        return json.load(response)


def check_serve(workdir: Path, expected: list) -> None:
    command = [str(BIN / "ptv2-serve"), "--model", str(workdir / "model"), "--prefix-len", str(PREFIX_LEN),
               "--task", f"demo={workdir / 'task.safetensors'}", "--host", "127.0.0.1", "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        line = _read_line(process, SERVE_START_TIMEOUT_S)
        check(line.startswith("serving on http://127.0.0.1:"), f"ptv2-serve started ({line.strip()!r})")
        url = line.split()[2]
        check(_http(url + "/health") == {"status": "ok"}, f"ptv2-serve answers /health at {url}")
        answer = _http(url + "/v1/predict", {"task": "demo", "inputs": [{"input_ids": SERVE_IDS}]})
        logits = answer["outputs"][0]["logits"]
        error = max(abs(a - b) for a, b in zip(logits, expected))
        check(len(logits) == len(expected) and error < 1e-4,
              f"ptv2-serve /v1/predict equals the in-process logits (max error {error:.1e})")
    except BaseException:
        process.kill()
        print(f"ptv2-serve's stderr: {process.communicate(timeout=HTTP_TIMEOUT_S)[1][-3000:]}", file=sys.stderr)
        raise
    process.kill()
    process.communicate(timeout=HTTP_TIMEOUT_S)

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", choices=("ahead-of-time", "jit"), required=True,
                        help="how the fused CPU kernel must have been had")
    parser.add_argument("--no-compiler", action="store_true", help="also check that no compiler is on PATH")
    parser.add_argument("--only-kernel", action="store_true", help="stop after the kernel and the op check")
    args = parser.parse_args()
    check_installed()
    check_kernel(args.kernel, args.no_compiler)
    check_op()
    if args.only_kernel:
        return
    with tempfile.TemporaryDirectory() as workdir:
        served = check_patch_model(Path(workdir))
        check_bench()
        check_serve(Path(workdir), served)
    print("smoke: all checks passed", flush=True)


if __name__ == "__main__":
    main()
