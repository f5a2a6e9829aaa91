"""Import ptv2_kernels before anything imports triton: on a machine without a GPU it switches Triton to
its interpreter (TRITON_INTERPRET=1), which Triton only reads at import."""

import ptv2_kernels  # noqa: F401
