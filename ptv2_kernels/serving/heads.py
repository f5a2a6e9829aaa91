"""Task heads on packed encoder outputs.

The backbone of a served model produces token states packed without padding, ``[total, hidden]`` with
``cu_seqlens`` ``[B + 1]`` (from the padded or the packed path alike); a :class:`Head` turns them into one
output per request. Each task may bring its own weights for the head module (what P-Tuning v2 and PEFT
train next to the prefix: ``classifier``; DeBERTa sequence classification: ``pooler`` and ``classifier``);
rows of tasks without them use the model's own head.
"""

from typing import Dict, List, Optional

import torch
from torch import nn
from torch.func import functional_call

from ..patching import family_of
from ..patching.base import BASE_POOLER, CONTEXT_POOLER

SEQUENCE_CLASSIFICATION = "sequence-classification"
TOKEN_CLASSIFICATION = "token-classification"
EMBEDDING = "embedding"


class PooledClassifier(nn.Module):
    """DeBERTa's sequence head as one module: ``pooler`` (``ContextPooler``, first token) then ``classifier``.
    A task's own weights cover both (keys ``pooler.*``, ``classifier.*``): P-Tuning v2 trains both."""

    def __init__(self, pooler: nn.Module, classifier: nn.Module):
        super().__init__()
        self.pooler, self.classifier = pooler, classifier

    def forward(self, first: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pooler(first))


class Head:
    """What a served model outputs per request, from its class.

    - ``*ForSequenceClassification``: ``logits`` ``[num_labels]``, as the family's ``sequence_head`` says (BERT:
      pooler then ``classifier``; RoBERTa, ELECTRA: ``classifier`` on the first token's state; DeBERTa:
      :class:`PooledClassifier`).
    - ``*ForTokenClassification``: ``logits`` ``[n, num_labels]``, one row per input token.
    - a bare base model (``BertModel``, ``DebertaV2Model``, ...): ``embedding`` ``[hidden]``, the mean of the
      token states (sentence-transformers pooling).

    ``module`` is what a task's own head weights replace (its state dict's keys), ``module_name`` names it
    (``classifier``, or ``pooler+classifier`` for DeBERTa sequence classification); both None for embeddings.
    """

    def __init__(self, model: nn.Module):
        name = type(model).__name__
        self.family = family_of(model)  # TypeError for a model of no known family
        self.base = model.base_model
        if name.endswith("ForSequenceClassification"):
            self.kind, self.output_name = SEQUENCE_CLASSIFICATION, "logits"
        elif name.endswith("ForTokenClassification"):
            self.kind, self.output_name = TOKEN_CLASSIFICATION, "logits"
        elif model is self.base:
            self.kind, self.output_name = EMBEDDING, "embedding"
        else:
            raise TypeError(f"serving supports *ForSequenceClassification, *ForTokenClassification and bare base "
                            f"models; got {name}")
        self.module: Optional[nn.Module] = None if self.kind == EMBEDDING else model.classifier
        self.module_name: Optional[str] = None if self.kind == EMBEDDING else "classifier"
        if self.kind == SEQUENCE_CLASSIFICATION and self.family.sequence_head == CONTEXT_POOLER:
            self.module, self.module_name = PooledClassifier(model.pooler, model.classifier), "pooler+classifier"
        self._cls_pooler = self.kind == SEQUENCE_CLASSIFICATION and self.family.sequence_head == BASE_POOLER

    def check_state(self, state: Dict[str, torch.Tensor]) -> None:
        """ValueError naming missing, unexpected or mis-shaped keys of a task's head weights."""
        if self.module is None:
            raise ValueError(f"this model ({self.kind}) has no task head; a task cannot bring head weights")
        expected = {k: tuple(v.shape) for k, v in self.module.state_dict().items()}
        given = {k: tuple(v.shape) for k, v in state.items()}
        missing, unexpected = sorted(expected.keys() - given.keys()), sorted(given.keys() - expected.keys())
        shapes = {k: (given[k], expected[k]) for k in expected.keys() & given.keys() if given[k] != expected[k]}
        if missing or unexpected or shapes:
            raise ValueError(f"task head weights do not fit the model's {self.module_name}: missing {missing}, "
                             f"unexpected {unexpected}, shape (given, model) {shapes}")

    def _module_inputs(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """What the head module reads: ``[B, 1, hidden]`` first-token states (pooled for BERT) or tokens."""
        if self.kind == TOKEN_CLASSIFICATION:
            return tokens
        first = tokens[cu_seqlens[:-1]].unsqueeze(1)
        return self.base.pooler(first) if self._cls_pooler else first

    def __call__(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor,
                 row_heads: List[Optional[dict]]) -> List[torch.Tensor]:
        """One output per row: ``tokens`` ``[total, hidden]`` packed by ``cu_seqlens``; ``row_heads[b]`` is
        row b's head weights (None: the model's own head). One head call per distinct weights."""
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        if self.kind == EMBEDDING:
            return [segment.mean(0) for segment in tokens.split(lengths)]
        inputs = self._module_inputs(tokens, cu_seqlens)
        per_token = self.kind == TOKEN_CLASSIFICATION
        owners = {id(h): h for h in row_heads}
        row_owner = torch.tensor([id(h) for h in row_heads], dtype=torch.int64)
        if per_token:
            row_owner = row_owner.repeat_interleave(torch.tensor(lengths))
        logits = None
        for key, state in owners.items():
            index = (row_owner == key).nonzero().squeeze(1).to(inputs.device)
            rows = inputs.index_select(0, index)
            out = self.module(rows) if state is None else functional_call(self.module, state, (rows,))
            logits = out.new_empty(inputs.shape[0], out.shape[-1]) if logits is None else logits
            logits.index_copy_(0, index, out)
        return list(logits.split(lengths)) if per_token else list(logits)
