"""P-Tuning v2 reference (THUDM) checkpoints load whole (CPU, tiny random models): a state dict in the layout of the
reference's ``*PrefixFor{Sequence,Token}Classification`` models (frozen backbone, trained head, prefix encoder) is
served with its head and gives the reference model's logits, computed independently here (the backbone with its
own pooler, patched with the prefix unpacked from the reference's ``past_key_values`` view, then the reference's
head); without the head the logits are far off; heads or backbones that do not fit are refused, loading nothing."""

import ptv2_kernels  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported on a CPU machine)

import copy

import pytest
import torch
import transformers
from torch import nn

from ptv2_kernels import patch_model
from ptv2_kernels.errors import CheckpointError
from ptv2_kernels.serving import PrefixServer
from ptv2_kernels.serving.checkpoints import load_task

from . import test_patch_bert, test_patch_deberta
from .test_serving import PREFIX_LEN, TOL, random_requests

# family: (transformers class prefix, the reference's backbone attribute, tiny config)
FAMILIES = {
    "bert": ("Bert", "bert", lambda: test_patch_bert.tiny_config("bert")),
    "roberta": ("Roberta", "roberta", lambda: test_patch_bert.tiny_config("roberta")),
    "deberta": ("Deberta", "deberta", lambda: test_patch_deberta.tiny_config("v1")),
    "deberta-v2": ("DebertaV2", "deberta", lambda: test_patch_deberta.tiny_config("v2-share-buckets")),
}


class ReferenceLayout(nn.Module):
    """The attributes of the reference's prefix models: ``<backbone>`` (frozen, with its pooler: the reference
    builds ``BertModel(config)`` / ``RobertaModel(config)``), DeBERTa sequence classification's own ``pooler``
    (``ContextPooler``), ``classifier`` (``Linear``) and ``prefix_encoder.embedding`` ``[P, 2·L·hidden]``."""

    def __init__(self, family, head, seed=3):
        super().__init__()
        prefix, self.backbone_name, make_config = FAMILIES[family]
        config = make_config()
        torch.manual_seed(seed)
        setattr(self, self.backbone_name, getattr(transformers, prefix + "Model")(config).eval())
        if head == "ForSequenceClassification" and family.startswith("deberta"):
            module = transformers.models.deberta_v2.modeling_deberta_v2 if family == "deberta-v2" else \
                transformers.models.deberta.modeling_deberta
            self.pooler = module.ContextPooler(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.prefix_encoder = nn.Module()
        self.prefix_encoder.embedding = nn.Embedding(PREFIX_LEN, 2 * config.num_hidden_layers * config.hidden_size)
        with torch.no_grad():
            for parameter in [*self.classifier.parameters(), *self.prefix_encoder.parameters(),
                              *getattr(self, "pooler", nn.Module()).parameters()]:
                parameter.normal_(std=0.5)
        self.family, self.head, self.config = family, head, config

    @property
    def backbone(self):
        return getattr(self, self.backbone_name)

    def compact_prefix(self):
        """The reference's ``get_prompt``: ``view(P, 2L, H, D)``, layer l's keys at 2l and values at 2l + 1."""
        c = self.config
        flat = self.prefix_encoder.embedding.weight.detach()
        heads = c.num_attention_heads
        return flat.view(PREFIX_LEN, 2 * c.num_hidden_layers, heads, -1).permute(1, 2, 0, 3).reshape(
            c.num_hidden_layers, 2, heads, PREFIX_LEN, -1)

    @torch.no_grad()
    def logits(self, request):
        """The reference model's forward on one request: patched backbone, then its head."""
        backbone = copy.deepcopy(self.backbone)
        patch_model(backbone, PREFIX_LEN).prefix.copy_(self.compact_prefix())
        out = backbone(input_ids=torch.tensor([request.input_ids]))
        if self.head == "ForTokenClassification":
            return self.classifier(out.last_hidden_state)[0]
        pooled = self.pooler(out.last_hidden_state) if hasattr(self, "pooler") else out.pooler_output
        return self.classifier(pooled)[0]

    def served_model(self):
        """transformers' head model on the same frozen backbone (its own head randomly initialised)."""
        prefix = FAMILIES[self.family][0]
        torch.manual_seed(9)
        model = getattr(transformers, prefix + self.head)(self.config).eval()
        missing = model.base_model.load_state_dict(self.backbone.state_dict(), strict=False)
        assert not missing.missing_keys
        return model


CASES = [(family, "ForSequenceClassification") for family in FAMILIES] + [("roberta", "ForTokenClassification")]


@pytest.mark.parametrize("family,head", CASES, ids=[f"{f}-{h[3:]}" for f, h in CASES])
def test_reference_checkpoint_loads_whole(family, head, tmp_path):
    reference = ReferenceLayout(family, head)
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    server = PrefixServer(reference.served_model(), PREFIX_LEN, max_tasks=2)
    load_task(server, "whole", tmp_path / "pytorch_model.bin")
    load_task(server, "prefix-only", tmp_path / "pytorch_model.bin", head=False)
    assert server.task_head("whole") is not None and server.task_head("prefix-only") is None
    requests = random_requests(["whole"], count=4, seed=12)
    worst_without_head = 0.0
    for request, result in zip(requests, server.predict(requests)):
        want = reference.logits(request)
        torch.testing.assert_close(result.output, want, **TOL)
        alone = server.predict([type(request)("prefix-only", input_ids=request.input_ids)])[0].output
        worst_without_head = max(worst_without_head, float((alone - want).abs().max() / want.abs().max()))
    assert worst_without_head > 0.1  # the model's own head is another function: the head must come along


def test_reference_heads_and_backbones_that_do_not_fit_load_nothing(tmp_path):
    reference = ReferenceLayout("roberta", "ForSequenceClassification")
    server = PrefixServer(reference.served_model(), PREFIX_LEN, max_tasks=2)
    state = reference.state_dict()
    bad = {
        "labels.bin": {**state, "classifier.weight": torch.randn(5, 32), "classifier.bias": torch.randn(5)},
        "no-pooler.bin": {k: v for k, v in state.items() if not k.startswith("roberta.pooler.")},
        "other-backbone.bin": {**state, "roberta.encoder.layer.0.output.dense.bias": torch.randn(32)},
        "bert-keys.bin": {**state, "bert.embeddings.word_embeddings.weight": torch.randn(64, 32)},
    }
    messages = {"labels.bin": r"out_proj\.weight.*\(5, 32\)", "no-pooler.bin": r"roberta\.pooler\.dense\.weight",
                "other-backbone.bin": "trained on another base model", "bert-keys.bin": "another model type"}
    for name, value in bad.items():
        torch.save(value, tmp_path / name)
        with pytest.raises(CheckpointError, match=messages[name]) as error:
            load_task(server, "x", tmp_path / name)
        assert name in str(error.value)
    embedding = PrefixServer(copy.deepcopy(reference.backbone), PREFIX_LEN, max_tasks=2)
    torch.save(state, tmp_path / "whole.bin")
    with pytest.raises(CheckpointError, match="head=False"):
        load_task(embedding, "x", tmp_path / "whole.bin")
    assert server.tasks() == [] and embedding.tasks() == []


def test_families_the_reference_lacks_load_the_prefix_encoder_alone(tmp_path):
    """The reference has no ELECTRA (nor XLM-RoBERTa, CamemBERT) model: a whole reference state dict is refused
    (there is no backbone to check it against), the prefix encoder's state dict alone loads."""
    server = PrefixServer(test_patch_bert.tiny_model("electra"), PREFIX_LEN, max_tasks=2)
    reference = ReferenceLayout("bert", "ForSequenceClassification")
    torch.save(reference.state_dict(), tmp_path / "whole.bin")
    with pytest.raises(CheckpointError, match="the reference has no electra models"):
        load_task(server, "x", tmp_path / "whole.bin")
    torch.save(reference.prefix_encoder.state_dict(), tmp_path / "prefix_encoder.bin")
    load_task(server, "prefix", tmp_path / "prefix_encoder.bin")
    assert torch.equal(server.task_prefix("prefix").float(), reference.compact_prefix())
    assert server.tasks() == ["prefix"]
