"""Import ptv2_kernels before anything imports triton: on a machine without a GPU it switches Triton to
its interpreter (TRITON_INTERPRET=1), which Triton only reads at import. Then give PEFT's BERT/RoBERTa
backbones the ``past_key_values`` name that transformers 5.24 renamed (tests only; see prefix_references)."""

import ptv2_kernels  # noqa: F401

from .prefix_references import install_peft_backbone_shim

install_peft_backbone_shim()
