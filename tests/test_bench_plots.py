"""``ptv2-bench --out DIR`` plots (the ``plots`` extra): one PNG per bench and swept axis, time and peak memory
per provider, from a results document; none (and no error) without matplotlib."""

import builtins

from ptv2_kernels.bench import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _doc():
    rows = []
    for provider, factor in (("concat-sdpa", 1.0), ("fused-torch", 0.6)):
        for n, p in ((256, 128), (128, 128), (512, 128), (256, 16), (256, 64)):
            for bench in ("kernel-fwd", "kernel-fwdbwd"):
                ms = factor * n * (n + p) / 1e3 * (3 if bench == "kernel-fwdbwd" else 1)
                rows.append(report.make_row(bench, provider, "bert-base", 8, 12, n, p, 64, "float32", ms=ms,
                                            peak_mb=None if (n, p) == (512, 128) else ms / 2))
    rows.append(report.make_row("serve", "peft", "bert-base", 8, 12, 256, 128, 64, "float32", ms=2000.0, peak_mb=280.0))
    return {"device": "cpu: test", "torch": "x", "triton": "x", "commit": "abc1234", "command": "ptv2-bench",
            "rows": rows, "skipped": [], "headline": dict(zip(("time_x", "memory_x", "case"), report.headline(rows)))}


def test_plots_per_bench_and_axis(tmp_path):
    written = report.plots(_doc(), tmp_path)
    names = sorted(path.name for path in written)
    assert names == ["kernel-fwd-vs-N.png", "kernel-fwd-vs-P.png", "kernel-fwdbwd-vs-N.png", "kernel-fwdbwd-vs-P.png"]
    for path in written:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_no_plots_without_matplotlib(tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert report.plots(_doc(), tmp_path) == []
    assert "ptv2_kernels[plots]" in capsys.readouterr().err
