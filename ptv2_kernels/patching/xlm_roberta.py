"""XLM-RoBERTa (multilingual) and CamemBERT: RoBERTa under other names (transformers' ``modeling_xlm_roberta`` and
``modeling_camembert`` are generated from ``modeling_roberta``), so RoBERTa's layout, position numbering and heads."""

from .bert import BertLike

XLM_ROBERTA = BertLike("xlm-roberta", "XLMRoberta", positions_after_padding_idx=True)
CAMEMBERT = BertLike("camembert", "Camembert", positions_after_padding_idx=True)
