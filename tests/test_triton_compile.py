"""The Triton kernels as the real Triton compiler builds them for sm_90 and sm_80, no GPU needed, checked against
the SPEC §4 compiler-evidence targets. ``scripts/kernel_report.py`` runs the public op (forward and backward) on
CPU tensors, captures every kernel launch and compiles it through Triton's own launch path, so each kernel gets
the specialization a GPU launch gets (pointer alignment, stride divisibility by 16, the config the autotuner or
the deterministic path would run: here the first of the pruned configs); registers and spills come from ptxas'
log, wgmma / mma.sync and fenced atomics from the SASS. Runs in a subprocess (TRITON_INTERPRET=0)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLAIN = ("padded", "varlen")  # the bank's paths are in the recorded report (benchmarks/results/kernel-report)
DROPOUT = ("dropout", "deterministic", "dropout-deterministic")  # attention + prefix dropout, and deterministic
SM90 = PLAIN + DROPOUT + ("deberta",)
SM80 = ("padded",)
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# two compiler processes side by side (CI has 2 cores): (arch, scenarios) each, the seed check with the second
JOBS = [((90, PLAIN + DROPOUT),), ((90, ("deberta",)), (80, SM80))]

SCRIPT = textwrap.dedent('''
    import json, sys
    sys.path.insert(0, "scripts")
    import kernel_report as kr  # first: selects the real compiler
    import tempfile
    import torch
    from triton import knobs

    jobs, seed_check = json.loads(sys.argv[1]), sys.argv[2] == "1"
    result = {"rows": []}
    with tempfile.TemporaryDirectory() as cache:
        knobs.cache.dir = cache
        for arch, scenarios in jobs:
            result["rows"] += kr.report([arch], ["bf16"], scenarios, "first")
        if seed_check:  # the seed is not specialized on: seeds 16 and 17 compile to the same kernel
            kr.driver.set_active(kr.CompileOnlyDriver(90))
            with kr.capturing() as launches:
                kr.scenario_dropout(torch.bfloat16)
            fwd = next(l for l in launches if l.fn.__name__ == "prefix_attention_fwd_kernel")
            meta = fwd.configs("first")[0][0]
            ptx = [fwd.fn.run(*fwd.args, grid=fwd.grid, warmup=True, **dict(fwd.kwargs, seed=seed), **meta).asm["ptx"]
                   for seed in (16, 17)]
            result["seed_specialized"] = ptx[0] != ptx[1]
    print(json.dumps(result))
''')


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, json.dumps(job), str(int(i == len(JOBS) - 1))], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, job in enumerate(JOBS)]
    merged = {"rows": []}
    for proc in procs:
        out, err = proc.communicate(timeout=1500)
        assert proc.returncode == 0, out[-2000:] + err[-4000:]
        part = json.loads(out.strip().splitlines()[-1])
        merged["rows"] += part.pop("rows")
        merged.update(part)
    return merged


def rows(report, arch, scenarios):
    selected = [r for r in report["rows"] if r["arch"] == arch and r["scenario"] in scenarios]
    assert {r["scenario"] for r in selected} == set(scenarios)
    return selected


def describe(row):
    return (f"{row['scenario']}/{row['kernel']} sm_{row['arch']}: {row['registers']} regs, {row['spill_bytes']} B "
            f"spills, {row['shared']} B smem, {row['ctas_per_sm']} CTAs/SM, wgmma {row['wgmma']}, fences "
            f"{row['fences']}")


def test_every_launch_compiles_for_both_targets(report):
    kernels = {r["kernel"] for r in rows(report, 90, ("padded", "dropout", "deterministic"))}
    assert kernels == {"prefix_attention_fwd_kernel", "prefix_attention_bwd_dq_kernel",
                       "prefix_attention_bwd_dprefix_kernel", "prefix_attention_bwd_dkdv_kernel",
                       "prefix_dropout_mask_kernel", "prefix_grad_reduce_kernel"}
    for arch, scenarios in ((90, SM90), (80, SM80)):
        for row in rows(report, arch, scenarios):
            assert row["shared"] <= SHARED_LIMIT[arch], describe(row)


def test_plain_path_targets_sm90(report):
    """SPEC §4: no spills, wgmma, >= 2 CTAs per SM, no fenced atomics (single prefix with padding, varlen)."""
    for row in rows(report, 90, PLAIN):
        assert row["spill_bytes"] == 0 and row["ctas_per_sm"] >= 2 and row["fences"] == 0, describe(row)
        assert row["wgmma"] > 0 and row["mma_sync"] == 0, describe(row)


def test_dropout_and_deterministic_sm90(report):
    """Dropout (attention and prefix), fast and deterministic: wgmma, relaxed atomics, no spills; the
    deterministic path has no atomics at all."""
    for row in rows(report, 90, DROPOUT):
        assert row["fences"] == 0 and row["spill_bytes"] == 0, describe(row)
        if row["kernel"] not in ("prefix_dropout_mask_kernel", "prefix_grad_reduce_kernel"):
            assert row["wgmma"] > 0, describe(row)
        if "deterministic" in row["scenario"]:
            assert row["atomics"] == 0, describe(row)


def test_deberta_sm90(report):
    """DeBERTa's c2p/p2c kernels: wgmma on 64 x 64 tiles, no fenced atomics. Spills stay bounded (a known miss of
    the target; benchmarks/results/kernel-report/README.md says why)."""
    for row in rows(report, 90, ("deberta",)):
        assert row["wgmma"] > 0 and row["fences"] == 0 and row["tiles"] == {"BLOCK_M": 64, "BLOCK_N": 64}, describe(row)
        assert row["spill_bytes"] <= 2 * 1024, describe(row)


def test_sm80_plain_path(report):
    """sm_80 (no SPEC target but DeBERTa's): mma.sync, no fenced atomics, at most a few spilled registers."""
    for row in rows(report, 80, ("padded",)):
        assert row["mma_sync"] > 0 and row["fences"] == 0 and row["spill_bytes"] <= 128, describe(row)


def test_seed_is_not_specialized(report):
    """One compiled variant for every seed (before, one call in 16 recompiled fwd/dq/dkdv mid-run)."""
    assert not report["seed_specialized"]
