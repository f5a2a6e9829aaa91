"""``python -m ptv2_kernels.bench``: same as the ``ptv2-bench`` console script."""

from .cli import main

raise SystemExit(main())
