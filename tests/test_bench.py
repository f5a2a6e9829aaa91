"""Smoke tests of ``ptv2-bench`` on the CPU (``--quick`` shapes, trimmed further to keep the suite fast)."""

import json
import re
import subprocess
import sys

import pytest
import torch

from ptv2_kernels.bench import cli, kernel, model

HEADLINE = re.compile(r"^fused/concat: time (\d+\.\d\d|n/a)x, peak memory (\d+\.\d\d|n/a)x$")
ROW_TYPES = {"bench": str, "provider": str, "model": str, "B": int, "H": int, "N": int, "P": int, "D": int,
             "dtype": str, "ms": float, "seq_per_s": float, "peak_mb": (float, type(None)), "tflops": (float, type(None))}
SMALL = ["--quick", "-B", "2", "-N", "64", "-P", "16", "8", "--no-progress"]


def run_cli(args, tmp_path, capsys):
    code = cli.main([*args, "--out", str(tmp_path)])
    lines = capsys.readouterr().out.strip().splitlines()
    return code, lines, json.loads((tmp_path / "results.json").read_text())


def check_schema(doc):
    for key in ("device", "torch", "triton", "commit", "command"):
        assert isinstance(doc[key], str) and doc[key]
    assert doc["device"].startswith("cpu")
    for row in doc["rows"]:
        for key, types in ROW_TYPES.items():
            assert isinstance(row[key], types), (key, row)
        assert row["bench"] in ("kernel-fwd", "kernel-fwdbwd", "train-step", "serve")
        assert row["ms"] > 0
        assert row["tflops"] is None  # CPU: no roofline
    for skip in doc["skipped"]:
        assert skip["reason"]


def test_kernel_mode(tmp_path, capsys):
    code, lines, doc = run_cli([*SMALL, "--mode", "kernel"], tmp_path, capsys)
    assert code == 0
    check_schema(doc)
    assert HEADLINE.match(lines[-1]), lines[-1]
    benches = {(r["bench"], r["provider"]) for r in doc["rows"]}
    for bench in kernel.BENCHES:
        assert {(bench, "fused-torch"), (bench, "concat-sdpa"), (bench, "concat-eager")} <= benches
    assert {(s["bench"], s["provider"]) for s in doc["skipped"]} >= {("kernel-fwd", "fused-cuda")}
    assert {(r["N"], r["P"]) for r in doc["rows"]} == {(64, 16), (64, 8)}
    assert all(r["max_err"] <= kernel.TOLERANCE[torch.float32] for r in doc["rows"])
    assert doc["headline"]["case"]["fused"] == "fused-torch"
    assert (tmp_path / "results.md").read_text().count("| kernel-fwd |") == 6


@pytest.mark.parametrize("mode", ["train", "serve"])
def test_model_modes(mode, tmp_path, capsys):
    code, lines, doc = run_cli([*SMALL, "--mode", mode], tmp_path, capsys)
    assert code == 0
    check_schema(doc)
    assert HEADLINE.match(lines[-1]), lines[-1]
    bench = "train-step" if mode == "train" else "serve"
    assert all(r["bench"] == bench for r in doc["rows"])
    assert "peft" in {r["provider"] for r in doc["rows"]}  # PEFT runs BERT on both CI stacks (README's table)
    assert "peft" not in {s["provider"] for s in doc["skipped"]}
    assert all(r["max_err"] <= 1e-3 for r in doc["rows"])  # the fused models match PEFT
    skipped_fused = {s["provider"] for s in doc["skipped"] if s["provider"].startswith("fused-")}
    assert {r["provider"] for r in doc["rows"]} | skipped_fused >= {"fused-torch", "peft"}


def test_compile_flag_adds_compiled_rows(tmp_path, capsys):
    """``--compile``: each provider eager and ``+compile``, the compiled model agreeing with the reference."""
    reference = model.reference_provider("bert-base")
    code, lines, doc = run_cli([*SMALL, "--mode", "train", "--compile", "--providers", f"fused-torch,{reference}"],
                               tmp_path, capsys)
    assert code == 0
    check_schema(doc)
    assert [r["provider"] for r in doc["rows"]] == [reference, reference + "+compile", "fused-torch",
                                                    "fused-torch+compile"]
    assert all(r["max_err"] <= 1e-3 for r in doc["rows"])


@pytest.mark.parametrize("provider", ["fused-torch", "concat-eager"])
@pytest.mark.parametrize("bench", kernel.BENCHES)
def test_providers_agree_on_benchmarked_inputs(provider, bench):
    """Independent of the bench's own check: same inputs, same outputs and gradients as concat-sdpa."""
    case = kernel.KernelCase("bert-base", 3, 2, 24, 5, 16, torch.float32, torch.device("cpu"))
    backward = bench == "kernel-fwdbwd"
    x = kernel.make_inputs(case, requires_grad=backward)
    assert not x.mask.all()  # the padding path is exercised
    call, checked = kernel.make_call(provider, x, backward)
    got = checked(call())
    assert len(got) == (6 if backward else 1)
    assert kernel.max_error(got, kernel.reference_outputs(case, bench), x.mask) < 1e-5


def test_error_is_detected():
    case = kernel.KernelCase("bert-base", 2, 2, 16, 4, 16, torch.float32, torch.device("cpu"))
    x = kernel.make_inputs(case, requires_grad=False)
    ref = kernel.reference_outputs(case, "kernel-fwd")
    assert kernel.max_error((ref[0] * 1.01,), ref, x.mask) > 1e-3


@pytest.mark.parametrize("args, message", [
    (["--providers", "fused-nope"], "unknown provider"),
    (["-N", "0"], "positive integer"),
    (["--model", "gpt2"], "invalid choice"),
    (["--mode", "train", "-N", "500", "-P", "64"], "N + P must be at most 512"),
])
def test_bad_arguments(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    assert exc.value.code != 0
    err = capsys.readouterr().err + str(exc.value.code)
    assert message in err


def test_module_entry_point_last_line():
    out = subprocess.run([sys.executable, "-m", "ptv2_kernels.bench", *SMALL, "--providers", "fused-torch,concat-sdpa"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert HEADLINE.match(out.strip().splitlines()[-1])


def test_model_mode_falls_back_to_concat_where_peft_refuses(tmp_path, capsys, monkeypatch):
    """Where PEFT refuses the installed transformers, the patched model with concatenating attention is the
    reference, and the output says so (the skipped ``peft`` entry)."""
    monkeypatch.setattr(model, "peft_refusal", lambda name: "PEFT refuses this transformers (simulated)")
    code, lines, doc = run_cli([*SMALL, "--mode", "train"], tmp_path, capsys)
    assert code == 0 and HEADLINE.match(lines[-1]), lines[-1]
    assert {r["provider"] for r in doc["rows"]} >= {"fused-torch", "concat-sdpa"}
    assert "peft" not in {r["provider"] for r in doc["rows"]}
    assert [s["reason"] for s in doc["skipped"] if s["provider"] == "peft"] == [
        "PEFT refuses this transformers (simulated); the concatenation reference is concat-sdpa instead"]
    assert doc["headline"]["case"]["concat"] == "concat-sdpa"
    assert all(r["max_err"] <= 1e-3 for r in doc["rows"])


def test_serve_http_varied_workload_and_ratios():
    """The varied workload mixes short and long texts (one in four long); ratios pair rows that differ only in the
    compared key."""
    from ptv2_kernels.bench import serve_http

    class Vocabulary:
        def get_vocab(self):
            return {w: i for i, w in enumerate(("alpha", "beta", "gamma", "delta", "x1"))}

    words = [len(text.split()) for _, text in serve_http.workload(Vocabulary(), "varied", count=400)]
    long = [n for n in words if n >= 120]
    assert all(120 <= n <= 240 or 4 <= n <= 16 for n in words) and 0.15 < len(long) / len(words) < 0.35
    assert all(8 <= len(text.split()) <= 48 for _, text in serve_http.workload(Vocabulary(), "uniform", count=50))
    rows = [{"workload": "varied", "engine": e, "mode": m, "concurrency": 4, "requests_per_s": rate}
            for e, m, rate in (("packed", "in-process", 40.0), ("packed", "http", 36.0), ("padded", "in-process", 10.0),
                               ("padded", "http", 9.0))]
    assert serve_http._ratios(rows, "mode", "http", "in-process") == {"varied/packed/4": 0.9, "varied/padded/4": 0.9}
    assert serve_http._ratios(rows, "engine", "packed", "padded") == {"varied/in-process/4": 4.0, "varied/http/4": 4.0}
