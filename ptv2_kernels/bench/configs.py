"""Embedded model shapes (random weights, no downloads) and the default benchmark sizes per device.

Shapes follow the public Hugging Face configs of each checkpoint; the kernel mode uses only the head
count and head size, the model modes build the whole model from ``config`` with random weights."""

from dataclasses import dataclass
from typing import Optional, Tuple

MODEL_CONFIGS = {
    "bert-base": {"model_type": "bert", "hidden_size": 768, "num_attention_heads": 12, "num_hidden_layers": 12,
                  "intermediate_size": 3072, "max_position_embeddings": 512, "vocab_size": 30522},
    "bert-large": {"model_type": "bert", "hidden_size": 1024, "num_attention_heads": 16, "num_hidden_layers": 24,
                   "intermediate_size": 4096, "max_position_embeddings": 512, "vocab_size": 30522},
    "roberta-large": {"model_type": "roberta", "hidden_size": 1024, "num_attention_heads": 16,
                      "num_hidden_layers": 24, "intermediate_size": 4096, "max_position_embeddings": 514,
                      "vocab_size": 50265, "pad_token_id": 1, "type_vocab_size": 1},
    "deberta-v3-base": {"model_type": "deberta-v2", "hidden_size": 768, "num_attention_heads": 12,
                        "num_hidden_layers": 12, "intermediate_size": 3072, "max_position_embeddings": 512,
                        "vocab_size": 128100, "relative_attention": True, "position_buckets": 256,
                        "max_relative_positions": -1, "pos_att_type": ["p2c", "c2p"],
                        "position_biased_input": False, "norm_rel_ebd": "layer_norm", "share_att_key": True,
                        "type_vocab_size": 0},
    "deberta-v2-xlarge": {"model_type": "deberta-v2", "hidden_size": 1536, "num_attention_heads": 24,
                          "num_hidden_layers": 24, "intermediate_size": 6144, "max_position_embeddings": 512,
                          "vocab_size": 128100, "relative_attention": True, "position_buckets": 256,
                          "max_relative_positions": -1, "pos_att_type": ["p2c", "c2p"],
                          "position_biased_input": False, "norm_rel_ebd": "layer_norm", "share_att_key": True,
                          "conv_kernel_size": 3, "conv_act": "gelu", "type_vocab_size": 0},
}
DEFAULT_MODEL = "bert-base"


def relative_attention(model: str) -> Optional[Tuple[int, int, int]]:
    """``(span, bucket_size, max_position)`` of a DeBERTa-v2/v3 config's relative attention (as transformers
    derives them: span = position_buckets if > 0, else max_relative_positions, else
    max_position_embeddings), or None for a model without it."""
    cfg = MODEL_CONFIGS[model]
    if not cfg.get("relative_attention"):
        return None
    max_position = cfg["max_relative_positions"]
    if max_position < 1:
        max_position = cfg["max_position_embeddings"]
    buckets = cfg.get("position_buckets", -1)
    return (buckets if buckets > 0 else max_position), buckets, max_position


def heads_and_dim(model: str) -> Tuple[int, int]:
    """(H, D) of an embedded config."""
    cfg = MODEL_CONFIGS[model]
    heads = cfg["num_attention_heads"]
    return heads, cfg["hidden_size"] // heads


@dataclass(frozen=True)
class Sizes:
    """Benchmark sizes. The first value of ``seq_lens`` and ``prefix_lens`` is the headline case; the
    other values sweep one axis with the other held at its headline value (the plots' x axes)."""

    batch: int
    seq_lens: Tuple[int, ...]
    prefix_lens: Tuple[int, ...]
    warmup: int
    repeats: int

    def cases(self):
        """Unique (N, P) pairs: the headline first, then the N sweep, then the P sweep."""
        n0, p0 = self.seq_lens[0], self.prefix_lens[0]
        pairs = [(n, p0) for n in self.seq_lens] + [(n0, p) for p in self.prefix_lens]
        return list(dict.fromkeys(pairs))


# GPU: SPEC §4 shapes. CPU: the same sweep at a batch a 2-core machine finishes in about a minute.
DEFAULT_SIZES = {
    "cuda": Sizes(batch=32, seq_lens=(256, 128, 512), prefix_lens=(128, 16, 64), warmup=10, repeats=50),
    "cpu": Sizes(batch=8, seq_lens=(256, 128, 512), prefix_lens=(128, 16, 64), warmup=1, repeats=5),
}
QUICK_SIZES = Sizes(batch=2, seq_lens=(128, 64), prefix_lens=(32, 16), warmup=1, repeats=3)
