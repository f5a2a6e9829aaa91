"""Results: the row schema, progress on stderr, the terminal/Markdown table, ``results.json``, PNG plots
(with the ``plots`` extra, ``pip install "ptv2_kernels[plots]"``: matplotlib) and the headline line."""

import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch
import triton

COLUMNS = ("bench", "provider", "model", "B", "H", "N", "P", "D", "dtype", "ms", "spread", "seq_per_s", "peak_mb",
           "tflops", "roofline_frac", "max_err")
HEADLINE_BENCHES = ("kernel-fwd", "train-step", "serve")
CONCAT = ("concat-sdpa", "peft")  # the concatenation baseline of kernel and model benches


def make_row(bench, provider, model, batch, heads, seq, prefix, dim, dtype, *, ms, peak_mb, tflops=None,
             roofline_frac=None, max_err=None, spread=None) -> Dict:
    """One ``results.json`` row: the issue 6 schema plus ``seq_per_s`` (sequences per second, 1000·B/ms),
    ``spread`` (half the range of the timing rounds over their median, :class:`~.measure.Timing`),
    ``roofline_frac`` (fraction of the SPEC §4 floor reached, GPU) and ``max_err`` (largest error
    relative to the concatenation baseline's outputs on the same inputs)."""
    return {"bench": bench, "provider": provider, "model": model, "B": batch, "H": heads, "N": seq,
            "P": prefix, "D": dim, "dtype": str(dtype).replace("torch.", ""), "ms": ms, "spread": spread,
            "seq_per_s": 1e3 * batch / ms, "peak_mb": peak_mb,
            "tflops": tflops, "roofline_frac": roofline_frac, "max_err": max_err}


class Progress:
    """``[i/n] label`` on stderr, rewritten in place on a terminal; silent when disabled."""

    def __init__(self, enabled: bool):
        self.enabled, self.done, self.total = enabled, 0, 0
        self.tty = sys.stderr.isatty()

    def extend(self, steps: int):
        self.total += steps

    def step(self, label: str):
        self.done += 1
        if self.enabled:
            end = "" if self.tty else "\n"
            print(f"\r\033[K[{self.done}/{self.total}] {label}" if self.tty else f"[{self.done}/{self.total}] {label}",
                  end=end, file=sys.stderr, flush=True)

    def close(self):
        if self.enabled and self.tty:
            print(file=sys.stderr)


def describe_device(device: torch.device) -> str:
    """Human-readable device, e.g. ``cuda: NVIDIA H100 80GB HBM3`` or ``cpu: <model>, 2 threads (no GPU)``."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = "" if torch.cuda.is_available() else " (no GPU)"
    return f"cpu: {name}, {torch.get_num_threads()} threads{gpu}"


def git_commit() -> str:
    """``git describe --always --dirty`` of the package's checkout, or ``unknown``."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def results(device: torch.device, command: str, rows: List[Dict], skipped: List[Dict]) -> Dict:
    """The ``results.json`` document."""
    time_x, memory_x, case = headline(rows)
    return {"device": describe_device(device), "torch": torch.__version__, "triton": triton.__version__,
            "commit": git_commit(), "command": command, "rows": rows, "skipped": skipped,
            "headline": {"time_x": time_x, "memory_x": memory_x, "case": case}}


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.2f}"
    return str(value)


def table(rows: List[Dict], markdown: bool = False) -> str:
    """Rows as a Markdown table, or aligned plain text for the terminal."""
    cells = [list(COLUMNS)] + [[_fmt(row[c]) for c in COLUMNS] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(r) + " |" for r in cells]
        lines.insert(1, "|" + "|".join(" --- " for _ in COLUMNS) + "|")
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells)


def fused_provider(rows: List[Dict], bench: str, case) -> Optional[Dict]:
    """The fastest fused row of ``bench`` at ``case`` (``fused-torch`` is the only one on the CPU)."""
    fused = [r for r in rows if r["bench"] == bench and r["provider"].startswith("fused-") and _case(r) == case]
    return min(fused, key=lambda r: r["ms"], default=None)


def _case(row):
    return row["model"], row["B"], row["N"], row["P"]


def headline(rows: List[Dict]):
    """(time concat/fused, peak memory concat/fused, case dict) for the first row of the first bench
    in ``HEADLINE_BENCHES`` that has both a fused and a concatenation (``CONCAT``) row; Nones if none has."""
    for bench in HEADLINE_BENCHES:
        for concat in (r for r in rows if r["bench"] == bench and r["provider"] in CONCAT):
            fused = fused_provider(rows, bench, _case(concat))
            if fused is None:
                continue
            memory_x = None
            if concat["peak_mb"] and fused["peak_mb"]:
                memory_x = concat["peak_mb"] / fused["peak_mb"]
            case = {"bench": bench, "fused": fused["provider"], "concat": concat["provider"], "model": fused["model"],
                    "B": fused["B"], "N": fused["N"], "P": fused["P"], "dtype": fused["dtype"]}
            return concat["ms"] / fused["ms"], memory_x, case
    return None, None, None


def headline_line(doc: Dict) -> str:
    """``fused/concat: time <X>x, peak memory <Y>x`` (``n/a`` where not measured)."""
    h = doc["headline"]

    def x(v):
        return "n/a" if v is None else f"{v:.2f}"

    return f"fused/concat: time {x(h['time_x'])}x, peak memory {x(h['memory_x'])}x"


def markdown(doc: Dict) -> str:
    """``results.md``: provenance, headline, table and skipped providers."""
    h = doc["headline"]
    lines = ["# ptv2-bench results", "",
             f"- device: {doc['device']}", f"- torch {doc['torch']}, triton {doc['triton']}",
             f"- commit: `{doc['commit']}`", f"- command: `{doc['command']}`"]
    if h["case"]:
        c = h["case"]
        lines.append(f"- headline ({c['bench']}, {c['model']}, B={c['B']}, N={c['N']}, P={c['P']}, {c['dtype']}, "
                     f"{c['concat']} over {c['fused']}): `{headline_line(doc)}`")
    lines += ["", table(doc["rows"], markdown=True), ""]
    if doc["skipped"]:
        lines += ["Skipped:", ""] + [f"- {s['bench']} / {s['provider']}: {s['reason']}" for s in doc["skipped"]]
    return "\n".join(lines) + "\n"


def plots(doc: Dict, out: Path) -> List[Path]:
    """``<bench>-vs-N.png`` and ``<bench>-vs-P.png``: time (left) and peak memory (right) per provider against N
    and against P, the other axis held at the headline value; one PNG per bench and swept axis with at least
    two points. Empty (with a note on stderr) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('note: matplotlib is not installed, no plots written (pip install "ptv2_kernels[plots]")',
              file=sys.stderr)
        return []
    h = doc["headline"]["case"]
    written = []
    for bench in dict.fromkeys(r["bench"] for r in doc["rows"]):
        base = next(r for r in doc["rows"] if r["bench"] == bench)
        fixed = {"N": h["N"] if h else base["N"], "P": h["P"] if h else base["P"]}
        for axis, other in (("N", "P"), ("P", "N")):
            rows = [r for r in doc["rows"] if r["bench"] == bench and r[other] == fixed[other]]
            if len({r[axis] for r in rows}) < 2:
                continue
            fig, axes = plt.subplots(1, 2, figsize=(10, 4))
            for provider in dict.fromkeys(r["provider"] for r in rows):
                mine = sorted((r for r in rows if r["provider"] == provider), key=lambda r: r[axis])
                axes[0].plot([r[axis] for r in mine], [r["ms"] for r in mine], marker="o", label=provider)
                memory = [r for r in mine if r["peak_mb"] is not None]
                axes[1].plot([r[axis] for r in memory], [r["peak_mb"] for r in memory], marker="o", label=provider)
            for ax, ylabel in zip(axes, ("ms (median)", "peak MiB above inputs")):
                ax.set_xlabel(f"{axis} ({other}={fixed[other]})")
                ax.set_ylabel(ylabel)
                ax.set_ylim(bottom=0)
                ax.grid(alpha=0.3)
            axes[0].legend()
            fig.suptitle(f"{bench}, {base['model']}, B={base['B']}, {base['dtype']} - {doc['device']}, "
                         f"commit {doc['commit']}", fontsize=9)
            fig.tight_layout()
            path = out / f"{bench}-vs-{axis}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            written.append(path)
    return written


def write(doc: Dict, out: Path) -> List[Path]:
    """``results.json``, ``results.md`` and the plots under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "results.md").write_text(markdown(doc))
    return [out / "results.json", out / "results.md", *plots(doc, out)]
