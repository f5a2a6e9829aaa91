"""patch_model / unpatch_model on tiny random DeBERTa (v1) and DeBERTa-v2 models (CPU, no downloads).

Two outside references:
- stock transformers, with an empty prefix (P = 0): the patched model must compute exactly what transformers
  computes (outputs on real tokens, gradients of every backbone parameter);
- ``reference_attention`` below, SPEC §2 written by concatenation: scores against ``cat([prefix_k, k])``, c2p and
  p2c gathered from the relative embeddings by relative position for the N×N block, zero on prefix columns,
  XSoftmax masking. It replaces the attention of an unpatched copy of the model, which gets positions shifted by P.
Outputs are compared on real tokens only (padded query rows may hold any finite value).
"""

import ptv2_kernels  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported on a CPU machine)

import copy
import functools
import importlib
import math

import pytest
import torch
import transformers

from ptv2_kernels import load_prefix, patch_model, save_prefix, unpatch_model
from ptv2_kernels.patching import base as patching_base

from .prefix_references import enable_activation_checkpointing
from .test_patch_bert import (assert_bank_rows_match_single_task_models, assert_unpatch_is_bit_identical,
                              real_outputs, weighted_sum)

PREFIX_LEN = 3
SEQ_LEN = 7
NUM_CHOICES = 2
TOL = dict(rtol=1e-4, atol=1e-5)

# name -> (v2, config overrides). Together: c2p|p2c, c2p or p2c alone, share_att_key on/off, log buckets on/off,
# max_relative_positions set (< N) and -1, absolute positions on/off, no relative attention, 2 and 4 heads.
CONFIGS = {
    "v1": (False, dict(pos_att_type="c2p|p2c")),
    "v1-span4-c2p": (False, dict(pos_att_type="c2p", max_relative_positions=4, position_biased_input=False)),
    "v1-absolute": (False, dict(relative_attention=False, pos_att_type=None)),
    "v2-share-buckets": (True, dict(pos_att_type="p2c|c2p", share_att_key=True, position_buckets=4,
                                    max_relative_positions=16, norm_rel_ebd="layer_norm", position_biased_input=False,
                                    conv_kernel_size=3)),
    "v2-noshare": (True, dict(pos_att_type="c2p|p2c", share_att_key=False, hidden_size=64, num_attention_heads=4)),
    "v2-p2c-buckets": (True, dict(pos_att_type="p2c", share_att_key=False, position_buckets=4,
                                  max_relative_positions=5)),
}
HEADS_V1 = ["Model", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "ForMaskedLM"]
HEADS_V2 = HEADS_V1 + ["ForMultipleChoice"]  # v1 has no multiple-choice head


def tiny_config(name, **overrides):
    """2 layers, head size 16, dropout 0, relative attention, pad id 1."""
    v2, values = CONFIGS[name]
    base = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                max_position_embeddings=24, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                pad_token_id=1, num_labels=2, type_vocab_size=2, relative_attention=True, max_relative_positions=-1)
    base.update(values)
    base.update(overrides)
    return (transformers.DebertaV2Config if v2 else transformers.DebertaConfig)(**base)


def tiny_model(name, head="ForSequenceClassification", seed=0, **overrides):
    torch.manual_seed(seed)
    prefix = "DebertaV2" if CONFIGS[name][0] else "Deberta"
    return getattr(transformers, prefix + head)(tiny_config(name, **overrides)).eval()


def random_inputs(model, batch=3, seq=SEQ_LEN, head="ForSequenceClassification"):
    """Random ids (never the pad id), token types, right padding: row 0 unpadded, the others >= 2 real tokens.
    Multiple-choice inputs get a choices dimension."""
    rows = batch * (NUM_CHOICES if head == "ForMultipleChoice" else 1)
    ids = torch.randint(2, model.config.vocab_size, (rows, seq))
    lengths = torch.randint(2, seq + 1, (rows,))
    lengths[0] = seq
    mask = torch.arange(seq)[None, :] < lengths[:, None]
    inputs = {"input_ids": ids.masked_fill(~mask, model.config.pad_token_id), "attention_mask": mask.long(),
              "token_type_ids": (torch.arange(seq)[None, :] >= seq // 2).long().expand(rows, seq)}
    if head == "ForMultipleChoice":
        inputs = {name: t.reshape(batch, NUM_CHOICES, seq) for name, t in inputs.items()}
    return inputs


def assert_close_lists(actual, expected, **tol):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **(tol or TOL))


def assert_same_grads(model, reference, **tol):
    """Gradients of every parameter of ``reference`` equal those of the same-named parameter of ``model``."""
    params = dict(model.named_parameters())
    compared = 0
    for name, p in reference.named_parameters():
        if p.grad is None:
            assert params[name].grad is None or not params[name].grad.any(), name
            continue
        torch.testing.assert_close(params[name].grad, p.grad, **(tol or TOL), msg=lambda m, n=name: f"{n}: {m}")
        compared += 1
    assert compared > 10


def empty_prefix(encoder):
    """Make ``encoder`` return its prefix with P = 0 positions (patch_model needs P >= 1)."""
    full = type(encoder).forward
    encoder.forward = functools.partial(lambda e: full(e)[..., :0, :], encoder)


# ----------------------------------------------------------------------------------------------------------------
# The concatenation reference (SPEC §2), tests only.

def deberta_v2_modeling():
    """``modeling_deberta_v2``, imported on first use: importing it while tests are collected replaces
    ``sys.modules["transformers"]``, which breaks test modules collected later that monkeypatch ``transformers``."""
    return importlib.import_module("transformers.models.deberta_v2.modeling_deberta_v2")


def _relative_index(module, seq, device):
    """``[N, N]`` rows of the relative embeddings used by query i and key j (c2p and p2c alike, as transformers
    gathers them), and the slice of the embedding table they index."""
    modeling = deberta_v2_modeling()
    v2 = isinstance(module, modeling.DisentangledSelfAttention)
    positions = torch.arange(seq, device=device)
    relative = positions[:, None] - positions[None, :]
    if v2:
        span = module.position_buckets if module.position_buckets > 0 else module.max_relative_positions
        if module.position_buckets > 0:
            relative = modeling.make_log_bucket_position(relative, module.position_buckets,
                                                         module.max_relative_positions).long()
        rows = slice(0, 2 * span)
    else:
        span = min(seq, module.max_relative_positions)
        rows = slice(module.max_relative_positions - span, module.max_relative_positions + span)
    return torch.clamp(relative + span, 0, 2 * span - 1), rows


def reference_attention(module, prefix_fn, hidden_states, attention_mask, output_attentions=False, query_states=None,
                        relative_pos=None, rel_embeddings=None):
    """SPEC §2 by concatenation. ``prefix_fn()``: this layer's ``[2, H, P, D]``."""
    v2 = isinstance(module, deberta_v2_modeling().DisentangledSelfAttention)
    batch, seq, _ = hidden_states.shape
    heads = module.num_attention_heads

    def split(t):  # [..., N, H*X] -> [B, H, N, X]
        return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

    if v2:
        q, k, v = (split(p(hidden_states)) for p in (module.query_proj, module.key_proj, module.value_proj))
    else:
        q, k, v = split(module.in_proj(hidden_states)).chunk(3, dim=-1)
        q = q + module.q_bias.view(heads, 1, -1)
        v = v + module.v_bias.view(heads, 1, -1)
    kinds = module.pos_att_type
    scale = 1 / math.sqrt(q.shape[-1] * (1 + len(kinds)))
    scores = q @ k.transpose(-1, -2)
    if module.relative_attention:
        index, rows = _relative_index(module, seq, q.device)
        table = module.pos_dropout(rel_embeddings)[rows]
        if v2:
            pos_key = module.key_proj if module.share_att_key else getattr(module, "pos_key_proj", None)
            pos_query = module.query_proj if module.share_att_key else getattr(module, "pos_query_proj", None)
        else:
            pos_key, pos_query = getattr(module, "pos_proj", None), getattr(module, "pos_q_proj", None)
        if "c2p" in kinds:  # q_i · Kr[δ(i, j)]
            gathered = split(pos_key(table)[None])[0][:, index]  # [H, N, N, D]
            scores = scores + torch.einsum("bhid,hijd->bhij", q, gathered)
        if "p2c" in kinds:  # k_j · Qr[δ(i, j)]
            gathered = split(pos_query(table)[None])[0][:, index]
            scores = scores + torch.einsum("bhjd,hijd->bhij", k, gathered)
    prefix_k, prefix_v = prefix_fn().to(q.dtype)
    scores = torch.cat([q @ prefix_k.transpose(-1, -2), scores], dim=-1) * scale
    pair_mask = attention_mask.bool()  # m_i · m_j, [B, 1, N, N]
    row_mask = pair_mask.any(-1, keepdim=True).expand(-1, -1, -1, prefix_k.shape[-2])  # prefix columns: m_i
    mask = torch.cat([row_mask, pair_mask], dim=-1)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).masked_fill(~mask, 0.0)  # XSoftmax
    out = module.dropout(probs) @ torch.cat([prefix_v.expand(batch, -1, -1, -1), v], dim=-2)
    return out.transpose(1, 2).flatten(2), None


def install_reference(reference, encoder, layers=None):
    """Make ``reference`` (an unpatched copy of the model) run :func:`reference_attention` in ``layers`` (default:
    the encoder's) over a copy of ``encoder``'s prefix. Returns that prefix parameter and the inputs transform
    that shifts absolute positions by P (the reference's ``past_key_values_length``)."""
    prefix = torch.nn.Parameter(encoder().detach().clone())
    layers = encoder.config.layers if layers is None else layers
    for slot, layer in enumerate(layers):
        module = reference.base_model.encoder.layer[layer].attention.self
        module.forward = functools.partial(reference_attention, module, functools.partial(prefix.__getitem__, slot))

    def shifted(inputs):
        if not reference.config.position_biased_input:
            return inputs
        seq = inputs["input_ids"].shape[-1]
        return {**inputs, "position_ids": torch.arange(PREFIX_LEN, PREFIX_LEN + seq)[None]}

    return prefix, shifted


# ----------------------------------------------------------------------------------------------------------------

def check_stock_parity(name, head, train, backend="torch"):
    """P = 0: outputs on real tokens and every parameter's gradient equal stock transformers'. (The patch numbers
    absolute positions for its P = 1, so both models get positions 0 … N-1 explicitly.)"""
    model = tiny_model(name, head)
    stock = copy.deepcopy(model)
    encoder = patch_model(model, 1, freeze_backbone=False, backend=backend)
    empty_prefix(encoder)
    model.train(train)
    stock.train(train)
    inputs = random_inputs(model, head=head)
    inputs["position_ids"] = torch.arange(inputs["input_ids"].shape[-1]).expand(inputs["input_ids"].shape)
    actual = real_outputs(model(**inputs, output_hidden_states=True), inputs["attention_mask"])
    expected = real_outputs(stock(**inputs, output_hidden_states=True), inputs["attention_mask"])
    assert_close_lists(actual, expected)
    weighted_sum(actual).backward()
    weighted_sum(expected).backward()
    assert_same_grads(model, stock)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name,head", [(name, head) for name, (v2, _) in CONFIGS.items()
                                       for head in (HEADS_V2 if v2 else HEADS_V1)])
def test_empty_prefix_matches_transformers(name, head, train):
    check_stock_parity(name, head, train)


def check_reference_parity(name, head, backend, train, batch=3, seq=SEQ_LEN, dtype=torch.float32, tol=None):
    """With a prefix: outputs, the prefix gradient and every backbone gradient equal the concatenation
    reference's."""
    model = tiny_model(name, head).to(dtype)
    reference = copy.deepcopy(model)
    encoder = patch_model(model, PREFIX_LEN, freeze_backbone=False, backend=backend).to(dtype)
    with torch.no_grad():
        encoder.prefix.normal_()
    reference_prefix, shifted = install_reference(reference, encoder)
    model.train(train)
    reference.train(train)
    inputs = random_inputs(model, batch=batch, seq=seq, head=head)
    actual = real_outputs(model(**inputs), inputs["attention_mask"])
    expected = real_outputs(reference(**shifted(inputs)), inputs["attention_mask"])
    assert_close_lists(actual, expected, **(tol or TOL))
    weighted_sum(actual).backward()
    weighted_sum(expected).backward()
    assert encoder.prefix.grad.abs().sum() > 0
    torch.testing.assert_close(encoder.prefix.grad, reference_prefix.grad, **(tol or TOL))
    assert_same_grads(model, reference, **(tol or TOL))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", CONFIGS)
def test_prefix_matches_concat_reference(name, train):
    check_reference_parity(name, "ForTokenClassification", "torch", train)


@pytest.mark.parametrize("head", HEADS_V2)
def test_prefix_matches_concat_reference_every_head(head):
    check_reference_parity("v2-share-buckets", head, "torch", True)
    if head != "ForMultipleChoice":
        check_reference_parity("v1", head, "torch", False)


@pytest.mark.parametrize("name,head,train,seq", [("v1", "ForSequenceClassification", True, 5),
                                                 ("v2-share-buckets", "ForMultipleChoice", False, 5),
                                                 ("v1-span4-c2p", "ForTokenClassification", True, 40),
                                                 ("v2-share-buckets", "Model", True, 37)])
def test_prefix_matches_concat_reference_triton(name, head, train, seq):
    """The fused c2p/p2c path; N = 37, 40 spans two tiles of the interpreter's 32 (clamped spans, buckets)."""
    check_reference_parity(name, head, "triton", train, batch=2, seq=seq)


def test_empty_prefix_matches_transformers_triton():
    check_stock_parity("v2-noshare", "ForQuestionAnswering", True, backend="triton")


@pytest.mark.parametrize("name", ["v1", "v2-share-buckets"])
def test_float64_gradients_match_reference(name):
    """float64: every gradient (prefix, projections, relative embeddings and their projections, so the c2p/p2c
    bias path into q and k) equals the concatenation reference's to 1e-10."""
    check_reference_parity(name, "ForSequenceClassification", "torch", True, dtype=torch.float64,
                           tol=dict(rtol=1e-10, atol=1e-10))


def test_gradcheck_through_the_bias_path():
    """torch.autograd.gradcheck of a one-layer patched DeBERTa-v2 (float64) in its inputs and its prefix."""
    model = tiny_model("v2-noshare", "Model", num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                       max_relative_positions=3).double()
    encoder = patch_model(model, 2, freeze_backbone=False)
    embeds = torch.randn(2, 4, 32, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])

    def run(embeds, prefix):
        encoder.forward = lambda: prefix  # the model reads the gradcheck input as its prefix
        return model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state[mask.bool()]

    prefix = encoder.prefix.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(run, (embeds, prefix), eps=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Options of patch_model.

def test_prompt_depth():
    """layers=[1]: layer 0 keeps transformers' attention (fed the relative-position carrier), layer 1 reads the
    prefix; equals the reference with the prefix on layer 1 only."""
    model = tiny_model("v2-noshare")
    reference = copy.deepcopy(model)
    encoder = patch_model(model, PREFIX_LEN, layers=[-1])
    assert encoder.prefix.shape == (1, 2, 4, PREFIX_LEN, 16)
    reference_prefix, shifted = install_reference(reference, encoder, layers=[1])
    inputs = random_inputs(model)
    out = model(**inputs, output_hidden_states=True)
    ref = reference(**shifted(inputs), output_hidden_states=True)
    assert_close_lists(real_outputs(out, inputs["attention_mask"]), real_outputs(ref, inputs["attention_mask"]))
    out.logits.sum().backward()
    ref.logits.sum().backward()
    torch.testing.assert_close(encoder.prefix.grad, reference_prefix.grad, **TOL)


def test_projection_and_prefix_dropout():
    """prefix_projection: the MLP's prefix drives the model (same logits as a plain encoder holding its output)
    and trains; prefix dropout (default config.hidden_dropout_prob) acts in train() only."""
    model = tiny_model("v1", hidden_dropout_prob=0.2)
    plain_model = copy.deepcopy(model)
    encoder = patch_model(model, PREFIX_LEN, prefix_projection=True, prefix_hidden_size=8)
    assert encoder.config.prefix_dropout == 0.2 and encoder().shape == (2, 2, 2, PREFIX_LEN, 16)
    inputs = random_inputs(model)
    logits = model(**inputs).logits
    plain = patch_model(plain_model, PREFIX_LEN)
    with torch.no_grad():
        plain.prefix.copy_(encoder())
    torch.testing.assert_close(plain_model(**inputs).logits, logits, **TOL)
    assert torch.equal(model(**inputs).logits, logits)
    logits.sum().backward()
    assert encoder.mlp[0].weight.grad.abs().sum() > 0
    model.train()
    torch.manual_seed(1)
    first = model(**inputs).logits
    assert not torch.equal(first, model(**inputs).logits)


def test_bank_rows_match_single_task_models():
    head = "ForMultipleChoice"
    model = tiny_model("v2-share-buckets", head)
    inputs = random_inputs(model, batch=4, head=head)
    assert_bank_rows_match_single_task_models(model, inputs, torch.tensor([2, 0, 2, 1]), PREFIX_LEN)


def test_save_and_load(tmp_path):
    model = tiny_model("v1", "ForMaskedLM")
    fresh = copy.deepcopy(model)
    encoder = patch_model(model, PREFIX_LEN, layers=[0], num_tasks=2)
    with torch.no_grad():
        encoder.prefix.normal_()
    path = tmp_path / "prefix.safetensors"
    save_prefix(encoder, path)
    loaded = load_prefix(path, fresh)
    assert loaded.config == encoder.config and loaded.config.model_type == "deberta"
    inputs = random_inputs(model)
    task_ids = torch.tensor([1, 0, 1])
    assert torch.equal(fresh(**inputs, task_ids=task_ids).logits, model(**inputs, task_ids=task_ids).logits)
    other = tiny_model("v2-noshare", "ForMaskedLM")  # 4 heads: does not match
    with pytest.raises(ValueError, match="does not match"):
        load_prefix(path, other)
    assert not hasattr(other, "prefix_encoder")


def test_positions_shift_only_with_absolute_positions(monkeypatch):
    """position_biased_input: positions P … P+N-1 (the reference's past_key_values_length); too long raises
    before any kernel runs; explicit position_ids are used as given. Relative attention only: no positions."""
    model = tiny_model("v1")  # max_position_embeddings 24
    patch_model(model, PREFIX_LEN)
    seen = []
    embeddings = model.base_model.embeddings.position_embeddings
    embeddings.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    model(**random_inputs(model))
    assert torch.equal(seen[-1], torch.arange(PREFIX_LEN, PREFIX_LEN + SEQ_LEN).expand(3, SEQ_LEN))
    model(**random_inputs(model), position_ids=torch.arange(SEQ_LEN)[None])
    assert torch.equal(seen[-1], torch.arange(SEQ_LEN)[None])

    def fail(*args, **kwargs):
        raise AssertionError("the kernel ran")

    monkeypatch.setattr(patching_base, "prefix_attention", fail)
    with pytest.raises(ValueError, match="max_position_embeddings is 24"):
        model(**random_inputs(model, seq=24 - PREFIX_LEN + 1))
    with pytest.raises(AssertionError, match="the kernel ran"):
        model(**random_inputs(model, seq=24 - PREFIX_LEN))
    relative_only = tiny_model("v2-share-buckets")
    patch_model(relative_only, 20)
    with pytest.raises(AssertionError, match="the kernel ran"):
        relative_only(**random_inputs(relative_only, seq=20))  # P + N > 24 is fine without absolute positions


def test_gradient_checkpointing():
    """The recomputed layers get the same prefix call (it travels in relative_pos, which checkpointing saves)."""
    model = tiny_model("v2-noshare")
    checkpointed = copy.deepcopy(model)
    encoders = [patch_model(m, PREFIX_LEN) for m in (model, checkpointed)]
    with torch.no_grad():
        encoders[1].prefix.copy_(encoders[0].prefix)
    enable_activation_checkpointing(checkpointed)
    inputs = random_inputs(model)
    for m in (model, checkpointed):
        m.train()
        m(**inputs, task_ids=None).logits.sum().backward()
    torch.testing.assert_close(encoders[1].prefix.grad, encoders[0].prefix.grad, **TOL)


def test_unpatch_is_bit_identical():
    model = tiny_model("v2-share-buckets", "ForMaskedLM")
    assert_unpatch_is_bit_identical(model, random_inputs)
    assert "forward" not in model.base_model.__dict__


def test_bfloat16_model():
    model = tiny_model("v1").to(torch.bfloat16)
    encoder = patch_model(model, PREFIX_LEN)
    logits = model(**random_inputs(model)).logits
    assert logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert encoder.prefix.dtype == torch.float32 and encoder.prefix.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------
# Bad input.

@pytest.mark.parametrize("name,overrides,error", [
    ("v1", dict(talking_head=True), "talking_head"),
    ("v1", dict(pos_att_type="c2p|p2p"), "pos_att_type"),
    ("v2-noshare", dict(pos_att_type="c2p|c2p"), "pos_att_type"),
    ("v2-noshare", dict(attention_head_size=8), "attention_head_size"),
])
def test_unsupported_configs(name, overrides, error):
    model = tiny_model(name, **overrides)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match=error):
        patch_model(model, PREFIX_LEN)
    assert not hasattr(model, "prefix_encoder") and [p.requires_grad for p in model.parameters()] == flags


def test_unsupported_calls():
    model = tiny_model("v1", "Model")
    patch_model(model, PREFIX_LEN)
    inputs = random_inputs(model)
    model.z_steps = 2  # enhanced mask decoding re-runs the last layer with query_states
    with pytest.raises(ValueError, match="query_states"):
        model(**inputs, output_hidden_states=True)
    model.z_steps = 0
    with pytest.raises(ValueError, match="2D"):
        model(**{**inputs, "attention_mask": inputs["attention_mask"][:, None, None, :]})
    module = model.encoder.layer[0].attention.self
    hidden = torch.randn(1, 4, 32)
    with pytest.raises(RuntimeError, match="outside a forward"):
        module(hidden, torch.ones(1, 1, 4, 4))
    model(**inputs)  # still works after the errors
