"""``ptv2-bench`` (``python -m ptv2_kernels.bench``): time and peak memory of fused prefix attention
against concatenation, at the kernel level and (with :func:`ptv2_kernels.patch_model`) for whole
models. ``cli`` parses arguments, ``configs`` holds the embedded model shapes, ``kernel`` and ``model``
define the providers of each mode, ``measure`` times and measures them, ``report`` writes the results."""
