"""``train`` and ``serve`` modes: whole models patched with :func:`ptv2_kernels.patch_model` vs PEFT
prefix tuning vs the concatenation baseline."""

PROVIDERS = ("peft",)


def run(mode, model_name, sizes, dtype, device, providers, progress, quick):
    """Rows and skipped entries of ``mode`` ("train" or "serve")."""
    bench = "train-step" if mode == "train" else "serve"
    try:
        from .. import patch_model  # noqa: F401
    except ImportError:
        reason = "needs ptv2_kernels.patch_model (SPEC §3), not in this version of the package"
        return [], [{"bench": bench, "provider": "all", "reason": reason}]
    raise NotImplementedError
