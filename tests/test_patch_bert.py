"""patch_model / unpatch_model on tiny random models of the BERT layout: BERT, RoBERTa, XLM-RoBERTa, CamemBERT and
ELECTRA (CPU, no downloads).

The outside reference is PEFT's ``PrefixTuningConfig`` loaded with the same prefix (its
``prompt_embeddings`` ``[P, 2·L·hidden]`` is the flat layout). Every comparison uses fresh random inputs
with padding; outputs are compared on real tokens only (padded query rows may hold any finite value)."""

import ptv2_kernels  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported on a CPU machine)

import copy
import os

import pytest
import torch
import transformers
from peft import PrefixTuningConfig, TaskType, get_peft_model

from ptv2_kernels import load_prefix, patch_model, save_prefix, unpatch_model
from ptv2_kernels.patching import base as patching_base
from ptv2_kernels.prefix_encoder import prefix_from_flat, prefix_to_flat

from .prefix_references import cache_argument, enable_activation_checkpointing

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# model type -> transformers' class-name prefix. The families added on the BERT layout (XLM-RoBERTa, CamemBERT,
# ELECTRA) run the tests BERT and RoBERTa run, parametrised over this table.
FAMILIES = {"bert": "Bert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta", "camembert": "Camembert",
            "electra": "Electra"}
ADDED_FAMILIES = ["xlm-roberta", "camembert", "electra"]
FAMILY_OVERRIDES = {"electra": dict(embedding_size=24, summary_last_dropout=0.0)}  # embeddings_project; no dropout
HEADS = ["Model", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
         "ForMultipleChoice", "ForMaskedLM"]
# PEFT task types whose PeftModel forward adds the prefix itself; the other heads get PEFT's prompt
# (get_prompt, a DynamicCache) passed as the cache argument with the mask widened by P ones, as PEFT does.
PEFT_TASKS = {"Model": TaskType.FEATURE_EXTRACTION, "ForSequenceClassification": TaskType.SEQ_CLS,
              "ForTokenClassification": TaskType.TOKEN_CLS, "ForQuestionAnswering": TaskType.QUESTION_ANS}
PREFIX_LEN = 4
SEQ_LEN = 7
NUM_CHOICES = 3
TOL = dict(rtol=1e-4, atol=1e-5)


def tiny_config(family, **overrides):
    """2 layers, 2 heads of 16, dropout 0, pad id 1 (RoBERTa positions start at padding_idx + 1)."""
    values = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                  max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                  pad_token_id=1, num_labels=2)
    values.update(FAMILY_OVERRIDES.get(family, {}))
    values.update(overrides)
    return getattr(transformers, FAMILIES[family] + "Config")(**values)


def tiny_model(family, head="ForSequenceClassification", seed=0, **overrides):
    torch.manual_seed(seed)
    cls = getattr(transformers, FAMILIES[family] + head)
    return cls(tiny_config(family, **overrides)).eval()


def random_inputs(model, batch=3, seq=SEQ_LEN, head="ForSequenceClassification"):
    """Fresh random token ids (never the pad id) with right padding; row 0 unpadded, the others random
    lengths >= 2. Multiple-choice inputs get a choices dimension."""
    rows = batch * (NUM_CHOICES if head == "ForMultipleChoice" else 1)
    ids = torch.randint(2, model.config.vocab_size, (rows, seq))
    lengths = torch.randint(2, seq + 1, (rows,))
    lengths[0] = seq
    mask = torch.arange(seq)[None, :] < lengths[:, None]
    ids = ids.masked_fill(~mask, model.config.pad_token_id)
    inputs = {"input_ids": ids, "attention_mask": mask.long()}
    if head == "ForMultipleChoice":
        inputs = {name: t.view(batch, NUM_CHOICES, seq) for name, t in inputs.items()}
    return inputs


def real_outputs(output, attention_mask):
    """Every tensor output (hidden-state tuples included), per-token ones restricted to real tokens."""
    mask = attention_mask.bool().reshape(-1, attention_mask.shape[-1])
    values = []
    for value in output.values():
        for tensor in value if isinstance(value, tuple) else (value,):
            if not isinstance(tensor, torch.Tensor):
                continue
            if tensor.dim() >= 2 and tuple(tensor.shape[:2]) == tuple(mask.shape):
                tensor = tensor[mask]
            values.append(tensor)
    return values


def weighted_sum(values, seed=123):
    """A scalar loss touching every output element with fixed random weights (drawn in float32, so outputs in any
    dtype get the same weights)."""
    generator = torch.Generator().manual_seed(seed)
    return sum((v * torch.randn(v.shape, generator=generator).to(v.dtype)).sum() for v in values)


def peft_reference(model, head, **prefix_options):
    """A PEFT prefix-tuning copy of ``model`` and a function running it on inputs."""
    reference = copy.deepcopy(model)
    task = PEFT_TASKS.get(head, TaskType.FEATURE_EXTRACTION)
    peft_config = PrefixTuningConfig(task_type=task, num_virtual_tokens=PREFIX_LEN, **prefix_options)
    peft_model = get_peft_model(reference, peft_config).train(model.training)

    def run(inputs):
        if head in PEFT_TASKS:
            return peft_model(**inputs)
        mask = inputs["attention_mask"]
        rows = mask.reshape(-1, mask.shape[-1]).shape[0]
        ones = torch.ones(*mask.shape[:-1], PREFIX_LEN, dtype=mask.dtype)
        return reference(input_ids=inputs["input_ids"], attention_mask=torch.cat([ones, mask], dim=-1),
                         **{cache_argument(reference): peft_model.get_prompt(rows)})

    return peft_model, run


def peft_prefix(peft_model):
    """PEFT's flat ``prompt_embeddings`` parameter ``[P, 2·L·hidden]``."""
    return peft_model.prompt_encoder["default"].embedding.weight


def assert_close_lists(actual, expected, **tol):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **(tol or TOL))


def skip_where_stock_fails(model, head):
    """Skip where the unpatched model itself fails on this transformers (found by trying it: e.g. transformers
    5.0.0's XLM-RoBERTa and CamemBERT multiple-choice heads read a pooler output their base model lacks)."""
    try:
        with torch.no_grad():
            model(**random_inputs(model, head=head))
    except Exception as error:  # noqa: BLE001  (whatever transformers raises, the model cannot run here)
        pytest.skip(f"transformers {transformers.__version__}: unpatched {type(model).__name__} fails: "
                    f"{type(error).__name__}: {error}")


def check_peft_parity(family, head, backend, train):
    model = tiny_model(family, head)
    skip_where_stock_fails(model, head)
    peft_model, run_reference = peft_reference(model, head)
    flat = peft_prefix(peft_model)
    with torch.no_grad():
        flat.normal_()
    encoder = patch_model(model, PREFIX_LEN, backend=backend)
    with torch.no_grad():
        encoder.prefix.copy_(prefix_from_flat(flat, 2, 2))
    model.train(train)
    peft_model.train(train)
    inputs = random_inputs(model, head=head)
    actual = real_outputs(model(**inputs), inputs["attention_mask"])
    expected = real_outputs(run_reference(inputs), inputs["attention_mask"])
    assert_close_lists(actual, expected)
    weighted_sum(actual).backward()
    weighted_sum(expected).backward()
    torch.testing.assert_close(encoder.prefix.grad, prefix_from_flat(flat.grad, 2, 2), **TOL)
    assert encoder.prefix.grad.abs().sum() > 0


@pytest.mark.parametrize("family,head,train", [(family, head, train) for family in ("bert", "roberta")
                                               for head in HEADS for train in (False, True)]
                         + [(family, head, True) for family in ADDED_FAMILIES for head in HEADS])
def test_peft_parity_torch(family, head, train):
    check_peft_parity(family, head, "torch", train)


@pytest.mark.parametrize("family,head,train", [("bert", "ForSequenceClassification", True),
                                               ("roberta", "ForTokenClassification", True),
                                               ("roberta", "ForMultipleChoice", False)])
def test_peft_parity_triton(family, head, train):
    check_peft_parity(family, head, "triton", train)


@pytest.mark.parametrize("family", FAMILIES)
def test_projection_matches_peft(family):
    """Reparameterization: PEFT's Embedding → Linear → Tanh → Linear with the same weights."""
    model = tiny_model(family)
    peft_model, run_reference = peft_reference(model, "ForSequenceClassification", prefix_projection=True,
                                               encoder_hidden_size=24)
    encoder = patch_model(model, PREFIX_LEN, prefix_projection=True, prefix_hidden_size=24)
    peft_encoder = peft_model.prompt_encoder["default"]
    with torch.no_grad():
        for p in list(encoder.parameters()) + list(peft_encoder.parameters()):
            p.normal_(std=0.3)
        encoder.embedding.weight.copy_(peft_encoder.embedding.weight)
        encoder.mlp.load_state_dict(peft_encoder.transform.state_dict())
    model.train()
    peft_model.train()
    inputs = random_inputs(model)
    actual = real_outputs(model(**inputs), inputs["attention_mask"])
    expected = real_outputs(run_reference(inputs), inputs["attention_mask"])
    assert_close_lists(actual, expected)
    weighted_sum(actual).backward()
    weighted_sum(expected).backward()
    torch.testing.assert_close(encoder.mlp[0].weight.grad, peft_encoder.transform[0].weight.grad, **TOL)
    torch.testing.assert_close(encoder.embedding.weight.grad, peft_encoder.embedding.weight.grad, **TOL)


def test_dropout_follows_the_model_mode():
    """Patching a model in eval mode gives deterministic outputs; train() turns prefix and attention dropout on."""
    model = tiny_model("bert", hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    encoder = patch_model(model, PREFIX_LEN)
    assert not encoder.training and encoder.config.prefix_dropout == 0.3
    inputs = random_inputs(model)
    assert torch.equal(model(**inputs).logits, model(**inputs).logits)
    model.train()
    assert encoder.training
    assert not torch.equal(model(**inputs).logits, model(**inputs).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_positions_shift_by_prefix_len(family):
    """BERT, ELECTRA: positions P … P+N-1. RoBERTa, XLM-RoBERTa, CamemBERT: padding_idx + P + cumsum for real tokens,
    padding_idx for pads."""
    model = tiny_model(family)
    patch_model(model, PREFIX_LEN)
    seen = []
    model.base_model.embeddings.position_embeddings.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    inputs = random_inputs(model)
    model(**inputs)
    mask = inputs["attention_mask"]
    if family in ("bert", "electra"):
        expected = torch.arange(PREFIX_LEN, PREFIX_LEN + SEQ_LEN).expand(mask.shape)
    else:
        expected = torch.where(mask.bool(), 1 + PREFIX_LEN + mask.cumsum(1), 1)
    assert torch.equal(seen[0], expected)


@pytest.mark.parametrize("family", ["bert", "electra"])
def test_prompt_depth(family):
    """layers=[1]: layer 0 runs its unchanged attention, only layer 1 reads a prefix (checked against the
    concatenation baseline), and the buffer is [1, 2, H, P, D]."""
    model = tiny_model(family)
    plain = copy.deepcopy(model)
    encoder = patch_model(model, PREFIX_LEN, layers=[-1])
    assert encoder.prefix.shape == (1, 2, 2, PREFIX_LEN, 16)
    inputs = random_inputs(model)
    out = model(**inputs, output_hidden_states=True)
    positions = torch.arange(PREFIX_LEN, PREFIX_LEN + SEQ_LEN)[None]
    ref = plain(**inputs, position_ids=positions, output_hidden_states=True)
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(out.hidden_states[1][mask], ref.hidden_states[1][mask], **TOL)
    assert not torch.allclose(out.hidden_states[2][mask], ref.hidden_states[2][mask], **TOL)
    with concat_baseline():
        baseline = model(**inputs)
    torch.testing.assert_close(out.logits, baseline.logits, **TOL)
    out.logits.sum().backward()
    assert encoder.prefix.grad.abs().sum() > 0


class concat_baseline:
    """Route patched models through ``concat_prefix_attention`` (the concatenation baseline) instead of
    the fused op, for reference runs."""

    def __enter__(self):
        def concat(*args, backend=None, **kwargs):
            return ptv2_kernels.concat_prefix_attention(*args, **kwargs)

        self._saved = patching_base.prefix_attention
        patching_base.prefix_attention = concat

    def __exit__(self, *exc):
        patching_base.prefix_attention = self._saved


def assert_bank_rows_match_single_task_models(model, inputs, task_ids, prefix_len):
    """Patch ``model`` with a bank of 3 and a deep copy with one prefix: each row of a mixed-task batch
    equals the single-prefix model loaded with its task's prefix, and each task's gradient is the sum
    over its rows. Multiple choice: one id per example."""
    single_model = copy.deepcopy(model)
    bank = patch_model(model, prefix_len, num_tasks=3)
    single = patch_model(single_model, prefix_len)
    logits = model(**inputs, task_ids=task_ids).logits
    weights = torch.randn(logits.shape)
    (logits * weights).sum().backward()
    for task in range(3):
        rows = task_ids == task
        with torch.no_grad():
            single.prefix.copy_(bank.prefix[task])
        single.prefix.grad = None
        expected = single_model(**{name: t[rows] for name, t in inputs.items()}).logits
        torch.testing.assert_close(logits[rows], expected, **TOL)
        (expected * weights[rows]).sum().backward()
        torch.testing.assert_close(bank.prefix.grad[task], single.prefix.grad, **TOL)


@pytest.mark.parametrize("family,head", [("roberta", "ForSequenceClassification"), ("roberta", "ForMultipleChoice"),
                                         ("xlm-roberta", "ForSequenceClassification"),
                                         ("electra", "ForMultipleChoice")])
def test_bank_rows_match_single_task_models(family, head):
    model = tiny_model(family, head)
    inputs = random_inputs(model, batch=4, head=head)
    assert_bank_rows_match_single_task_models(model, inputs, torch.tensor([2, 0, 2, 1]), PREFIX_LEN)


def test_bank_with_projection_shapes_and_grads():
    model = tiny_model("bert")
    encoder = patch_model(model, PREFIX_LEN, num_tasks=2, prefix_projection=True, prefix_hidden_size=8)
    assert encoder().shape == (2, 2, 2, 2, PREFIX_LEN, 16)
    inputs = random_inputs(model)
    model(**inputs, task_ids=torch.tensor([1, 1, 1])).logits.sum().backward()
    grad = encoder.embedding.weight.grad
    assert grad[:PREFIX_LEN].abs().sum() == 0 and grad[PREFIX_LEN:].abs().sum() > 0


@pytest.mark.parametrize("task_ids,error", [(None, "task_ids is required"), (torch.tensor([0, 3, 1]), "must lie in"),
                                            (torch.tensor([-1, 0, 1]), "must lie in"),
                                            (torch.tensor([0, 1]), "one entry per example")])
def test_bad_task_ids(task_ids, error):
    model = tiny_model("bert")
    patch_model(model, PREFIX_LEN, num_tasks=3)
    with pytest.raises(ValueError, match=error):
        model(**random_inputs(model), task_ids=task_ids)


def test_task_ids_without_bank():
    model = tiny_model("bert")
    patch_model(model, PREFIX_LEN)
    with pytest.raises(ValueError, match="num_tasks=1"):
        model(**random_inputs(model), task_ids=torch.zeros(3, dtype=torch.long))


def test_too_long_raises_before_any_kernel(monkeypatch):
    model = tiny_model("roberta")  # max_position_embeddings 40, positions start at padding_idx + 1 = 2
    patch_model(model, 20)

    def fail(*args, **kwargs):
        raise AssertionError("the kernel ran")

    monkeypatch.setattr(patching_base, "prefix_attention", fail)
    with pytest.raises(ValueError, match="max_position_embeddings is 40"):
        model(**random_inputs(model, seq=19))
    with pytest.raises(AssertionError, match="the kernel ran"):
        model(**random_inputs(model, seq=18))


def test_unsupported_models_and_options():
    with pytest.raises(TypeError, match="BertModel, RobertaModel, XLMRobertaModel, CamembertModel, ElectraModel"):
        patch_model(torch.nn.Linear(2, 2), PREFIX_LEN)
    distil = transformers.DistilBertModel(transformers.DistilBertConfig(vocab_size=32, dim=32, n_layers=1, n_heads=2,
                                                                        hidden_dim=37))
    with pytest.raises(TypeError, match="DistilBertModel"):
        patch_model(distil, PREFIX_LEN)
    decoder = tiny_model("bert", "Model", is_decoder=True)
    with pytest.raises(ValueError, match="is_decoder=True"):
        patch_model(decoder, PREFIX_LEN)
    model = tiny_model("bert")
    for options, error in [({"layers": [2]}, "layers must be indices"), ({"layers": [0, -2]}, "distinct"),
                           ({"layers": []}, "non-empty"), ({"num_tasks": 0}, "num_tasks"),
                           ({"backend": "cuda2"}, "backend"), ({"prefix_dropout": 1.0}, "prefix_dropout")]:
        with pytest.raises(ValueError, match=error):
            patch_model(model, PREFIX_LEN, **options)
    with pytest.raises(ValueError, match="prefix_len"):
        patch_model(model, 0)
    assert not hasattr(model, "prefix_encoder")  # failed patches leave nothing behind


@pytest.mark.parametrize("version", ["4.57.6", "6.0.0"])
def test_transformers_outside_the_range_is_refused(monkeypatch, version):
    from ptv2_kernels.patching import compat

    # the module object patch_model reads (importing peft can replace sys.modules["transformers"])
    monkeypatch.setattr(compat.transformers, "__version__", version)
    model = tiny_model("bert")
    with pytest.raises(RuntimeError, match=rf"transformers {version}: .*supports transformers>=5\.0\.0,<6"):
        patch_model(model, PREFIX_LEN)
    assert not hasattr(model, "prefix_encoder")


def test_bfloat16_model_with_float32_prefix():
    """The prefix parameters stay float32; the patched attention casts them to the activations' dtype."""
    model = tiny_model("roberta").to(torch.bfloat16)
    encoder = patch_model(model, PREFIX_LEN)
    assert encoder.prefix.dtype == torch.float32
    logits = model(**random_inputs(model)).logits
    assert logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert encoder.prefix.grad.dtype == torch.float32 and encoder.prefix.grad.abs().sum() > 0


def test_patch_twice_and_unpatch_unpatched():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="not patched"):
        unpatch_model(model)
    patch_model(model, PREFIX_LEN)
    with pytest.raises(RuntimeError, match="already patched"):
        patch_model(model, PREFIX_LEN)


def test_4d_attention_mask_is_refused():
    model = tiny_model("bert")
    patch_model(model, PREFIX_LEN)
    inputs = random_inputs(model)
    inputs["attention_mask"] = inputs["attention_mask"][:, None, None, :]
    with pytest.raises(ValueError, match="2D"):
        model(**inputs)


def assert_unpatch_is_bit_identical(model, make_inputs):
    """Patch ``model`` (layer 0), run it and unpatch it: no encoder is left, the requires_grad flags are back and
    its logits equal an untouched copy's bit for bit, in eval and in train (``make_inputs(model)``: a batch)."""
    never = copy.deepcopy(model)
    flags = [p.requires_grad for p in model.parameters()]
    patch_model(model, PREFIX_LEN, layers=[0])
    model(**make_inputs(model))
    unpatch_model(model)
    assert not hasattr(model, "prefix_encoder")
    assert [p.requires_grad for p in model.parameters()] == flags
    for train in (False, True):
        model.train(train)
        never.train(train)
        inputs = make_inputs(model)
        assert torch.equal(model(**inputs).logits, never(**inputs).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_unpatch_is_bit_identical(family):
    assert_unpatch_is_bit_identical(tiny_model(family, "ForMaskedLM"), random_inputs)


def test_two_models_in_one_process():
    """Patching, running and unpatching one model never changes another (BERT and RoBERTa, patched and not)."""
    bert, roberta = tiny_model("bert"), tiny_model("roberta")
    bert_plain = copy.deepcopy(bert)
    bert_other = copy.deepcopy(bert)
    inputs = random_inputs(bert)
    expected_plain = bert_plain(**inputs).logits
    encoder = patch_model(bert, PREFIX_LEN)
    patch_model(roberta, 2, layers=[1])
    patched_logits = bert(**inputs).logits
    roberta_logits = roberta(**inputs).logits
    assert torch.equal(bert_plain(**inputs).logits, expected_plain)
    other = patch_model(bert_other, PREFIX_LEN)
    with torch.no_grad():
        other.prefix.copy_(encoder.prefix)
    assert torch.equal(bert_other(**inputs).logits, patched_logits)
    unpatch_model(bert)
    assert torch.equal(bert_other(**inputs).logits, patched_logits)
    assert torch.equal(roberta(**inputs).logits, roberta_logits)
    assert torch.equal(bert(**inputs).logits, expected_plain)


def test_freezing_keeps_head_and_prefix_trainable():
    model = tiny_model("bert", "ForMaskedLM")
    encoder = patch_model(model, PREFIX_LEN)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "prefix_encoder.prefix" in trainable
    assert all(not name.startswith("bert.") for name in trainable)
    assert "cls.predictions.transform.dense.weight" in trainable
    assert not model.bert.embeddings.word_embeddings.weight.requires_grad  # tied to the MLM decoder
    unpatch_model(model)
    model2 = tiny_model("bert")
    patch_model(model2, PREFIX_LEN, freeze_backbone=False)
    assert all(p.requires_grad for p in model2.parameters())
    assert encoder.prefix.requires_grad


def test_gradient_checkpointing_and_call_outside_model():
    model = tiny_model("bert")
    encoder = patch_model(model, PREFIX_LEN)
    model.train()
    inputs = random_inputs(model)
    expected = model(**inputs).logits
    weighted_sum([expected]).backward()
    grad = encoder.prefix.grad.clone()
    encoder.prefix.grad = None
    enable_activation_checkpointing(model, {"use_reentrant": False})
    logits = model(**inputs).logits
    weighted_sum([logits]).backward()
    torch.testing.assert_close(logits, expected)
    torch.testing.assert_close(encoder.prefix.grad, grad)
    attention = model.bert.encoder.layer[0].attention.self
    with pytest.raises(RuntimeError, match="outside a forward"):
        attention(torch.randn(1, 3, 32))


def test_save_load_into_model(tmp_path):
    model = tiny_model("roberta", "ForTokenClassification")
    encoder = patch_model(model, PREFIX_LEN, layers=[1], num_tasks=2, prefix_projection=True, prefix_hidden_size=8)
    with torch.no_grad():
        for p in encoder.parameters():
            p.normal_()
    inputs = random_inputs(model)
    task_ids = torch.tensor([1, 0, 1])
    expected = model(**inputs, task_ids=task_ids).logits
    save_prefix(encoder, tmp_path / "prefix.safetensors")
    fresh = tiny_model("roberta", "ForTokenClassification")
    loaded = load_prefix(tmp_path / "prefix.safetensors", fresh)
    assert loaded is fresh.prefix_encoder and loaded.config == encoder.config
    torch.testing.assert_close(fresh(**inputs, task_ids=task_ids).logits, expected)
    bert = tiny_model("bert")
    with pytest.raises(ValueError, match="model_type"):
        load_prefix(tmp_path / "prefix.safetensors", bert)
    assert not hasattr(bert, "prefix_encoder")


def test_flat_prefix_roundtrip_with_peft_file_layout():
    """prompt_embeddings [P, 2·L·hidden] ↔ compact, as PEFT's get_prompt splits it per layer."""
    model = tiny_model("bert")
    peft_model, _ = peft_reference(model, "ForSequenceClassification")
    flat = torch.randn(PREFIX_LEN, 2 * 2 * 32)
    compact = prefix_from_flat(flat, 2, 2)
    per_layer = flat.view(1, PREFIX_LEN, 4, 2, 16).permute([2, 0, 3, 1, 4]).split(2)
    for layer, pair in enumerate(per_layer):
        assert torch.equal(compact[layer], pair[:, 0])
    assert torch.equal(prefix_to_flat(compact), flat)
    assert peft_prefix(peft_model).shape == flat.shape


def test_convergence_matches_concat_baseline():
    """Liger-style: 25 AdamW steps from the same seed, fused vs concatenation baseline (dropout 0): the
    loss curves agree and the loss falls."""

    def train(use_baseline):
        model = tiny_model("bert", seed=3)
        encoder = patch_model(model, PREFIX_LEN, prefix_projection=True, prefix_hidden_size=16)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
        generator = torch.Generator().manual_seed(7)
        inputs = {"input_ids": torch.randint(2, 64, (16, 6), generator=generator),
                  "attention_mask": (torch.rand(16, 6, generator=generator) > 0.2).long()}
        inputs["attention_mask"][:, 0] = 1
        labels = torch.randint(0, 2, (16,), generator=generator)
        losses = []
        for _ in range(25):
            with concat_baseline() if use_baseline else torch.enable_grad():
                loss = model(**inputs, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert encoder.embedding.weight.grad is not None
        return torch.tensor(losses)

    fused, baseline = train(False), train(True)
    torch.testing.assert_close(fused, baseline, rtol=1e-3, atol=1e-4)
    assert fused[-1] < 0.7 * fused[0]


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_deep_copy_reads_its_own_prefix(family):
    """A deep copy of a patched model is patched with its own prefix and state, not the original's."""
    model = tiny_model(family).eval()
    patch_model(model, PREFIX_LEN)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.prefix_encoder.prefix.add_(1.0)
    inputs = random_inputs(model)
    assert not torch.allclose(model(**inputs).logits, clone(**inputs).logits)
    unpatch_model(clone)
    assert model.prefix_encoder is not None
