"""transformers compatibility of the patch (any version in the supported range, CPU, tiny random models):

- positions against transformers' own prefix semantics, an unpatched model over a ``DynamicCache`` holding the
  prefix (float64): BERT and RoBERTa, with padding, ``inputs_embeds`` and explicit ``position_ids``, both backends;
- the attention goes through the registered ``AttentionInterface`` function on patched modules only (the model's
  config, its mask creation and its unpatched layers keep their implementation, eager or sdpa);
- simulated unknown layouts (a signature, a class, an attribute, a bypassed attention) raise the clear
  RuntimeError at ``patch_model`` (or at the first forward, for a bypass) and never run;
- patched models pickle, ``torch.save``/``torch.load`` (also into a fresh process) and ``copy.deepcopy``, all
  families, with identical logits.
"""

import ptv2_kernels  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported on a CPU machine)

import copy
import io
import pickle
import subprocess
import sys

import pytest
import torch
import transformers
from transformers.models.bert import modeling_bert
from transformers.models.deberta import modeling_deberta
from transformers.models.electra import modeling_electra
from transformers.models.roberta import modeling_roberta
from transformers.models.xlm_roberta import modeling_xlm_roberta

from ptv2_kernels import patch_model, unpatch_model
from ptv2_kernels.patching import bert as patching_bert
from ptv2_kernels.patching import patch_state

from . import test_patch_deberta as deberta_tests
from .prefix_references import dynamic_cache_outputs, prefix_cache
from .test_patch_bert import FAMILIES, PREFIX_LEN, random_inputs, real_outputs, tiny_model, weighted_sum

RANGE = r"supports transformers>=5\.0\.0,<6"
VERSION = transformers.__version__.replace(".", r"\.")


def snapshot(model):
    """Everything patching could change: hooks, instance forwards, attention configs, flags, attributes, weights."""
    return {
        "hooks": [(name, len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules()],
        "forwards": [name for name, m in model.named_modules() if "forward" in m.__dict__],
        "configs": [(name, m.config is model.config, getattr(m.config, "_attn_implementation", None))
                    for name, m in model.named_modules() if hasattr(m, "config")],
        "requires_grad": [(name, p.requires_grad) for name, p in model.named_parameters()],
        "attributes": sorted(model.__dict__),
        "modules": [name for name, _ in model.named_modules()],
        "weights": {name: t.clone() for name, t in model.state_dict().items()},
    }


def assert_unchanged(model, before, inputs, logits):
    """``model`` is exactly as ``before`` (a :func:`snapshot`) and still gives ``logits`` on ``inputs``."""
    after = snapshot(model)
    weights = after.pop("weights")
    expected = dict(before)
    assert after == {k: v for k, v in expected.items() if k != "weights"}
    assert weights.keys() == before["weights"].keys()
    assert all(torch.equal(weights[k], before["weights"][k]) for k in weights)
    assert torch.equal(model(**inputs).logits, logits)


# ---- positions against transformers' DynamicCache semantics ------------------------------------------------
def position_case(model, case):
    """Inputs of one case: right padding (RoBERTa positions skip pads), ``inputs_embeds`` (no ids: RoBERTa
    numbers positions unshifted) or explicit ``position_ids`` (used as given by both)."""
    inputs = {**random_inputs(model), "output_hidden_states": True}
    if case == "inputs_embeds":
        inputs["inputs_embeds"] = model.base_model.embeddings.word_embeddings(inputs.pop("input_ids")).detach()
    elif case == "position_ids":
        inputs["position_ids"] = torch.randint(0, 40 - 1, inputs["input_ids"].shape)
    return inputs


def as_float64(inputs):
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}


@pytest.mark.parametrize("family,case,backend", [
    (family, case, backend) for family in ("bert", "roberta") for case in ("padding", "inputs_embeds", "position_ids")
    for backend in ("torch", "triton")] + [
    (family, case, "torch") for family in ("xlm-roberta", "camembert", "electra")
    for case in ("padding", "inputs_embeds", "position_ids")])
def test_positions_match_dynamic_cache_semantics(family, case, backend):
    model = tiny_model(family, "ForTokenClassification")
    reference = copy.deepcopy(model).double()
    encoder = patch_model(model, PREFIX_LEN, backend=backend)
    with torch.no_grad():
        encoder.prefix.normal_()
    inputs = position_case(model, case)
    prefix = encoder.prefix.detach().double().requires_grad_()
    expected = real_outputs(dynamic_cache_outputs(reference, prefix, **as_float64(inputs)), inputs["attention_mask"])
    actual = real_outputs(model(**inputs), inputs["attention_mask"])
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-5)
    weighted_sum(actual).backward()
    weighted_sum(expected).backward()
    torch.testing.assert_close(encoder.prefix.grad.double(), prefix.grad, rtol=1e-4, atol=1e-5)
    assert prefix.grad.abs().sum() > 0


def test_positions_differ_without_the_shift():
    """The reference is sensitive to positions: unshifted RoBERTa positions are far from it (the test above can
    fail)."""
    model = tiny_model("roberta", "ForTokenClassification").double()
    prefix = torch.randn(2, 2, 2, PREFIX_LEN, 16, dtype=torch.float64)
    inputs = random_inputs(model)
    mask = inputs["attention_mask"]
    expected = dynamic_cache_outputs(model, prefix, **inputs).logits
    unshifted = dynamic_cache_outputs(model, prefix, **inputs, position_ids=torch.where(mask.bool(), 1 + mask.cumsum(1),
                                                                                        1)).logits
    assert (unshifted - expected)[mask.bool()].abs().max() > 1e-2


# ---- the attention interface -------------------------------------------------------------------------------
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_only_patched_modules_route_to_the_prefix_attention(implementation):
    """Prompt depth on an eager or sdpa model: the model's config is untouched, the unpatched layer keeps the
    model's implementation (and transformers' mask), the patched one names the registered function."""
    model = tiny_model("bert", attn_implementation=implementation)
    plain = copy.deepcopy(model)
    patch_model(model, PREFIX_LEN, layers=[1])
    layers = model.bert.encoder.layer
    assert model.config._attn_implementation == implementation
    assert layers[0].attention.self.config is model.config
    assert layers[1].attention.self.config._attn_implementation == patching_bert.ATTENTION_NAME
    assert transformers.AttentionInterface()[patching_bert.ATTENTION_NAME] is patching_bert.prefix_attention_interface
    inputs = random_inputs(model)
    positions = torch.arange(PREFIX_LEN, PREFIX_LEN + inputs["input_ids"].shape[1])[None]
    out = model(**inputs, output_hidden_states=True)
    ref = plain(**inputs, position_ids=positions, output_hidden_states=True)
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(out.hidden_states[1][mask], ref.hidden_states[1][mask], rtol=1e-5, atol=1e-6)
    unpatch_model(model)
    assert all(layer.attention.self.config is model.config for layer in layers)


def test_model_level_use_of_the_name_is_refused():
    """Naming the function as a whole model's implementation would give transformers no mask: refused loudly."""
    model = tiny_model("bert")
    model.config._attn_implementation = patching_bert.ATTENTION_NAME
    with pytest.raises(RuntimeError, match="never as a whole model's attn_implementation"):
        model(**random_inputs(model))


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")  # the old name, on purpose
@pytest.mark.parametrize("argument", ["past_key_values", "cache"])
def test_a_cache_is_refused(argument):
    model = tiny_model("bert")
    patch_model(model, PREFIX_LEN)
    with pytest.raises(ValueError, match=f"{argument} must be None"):
        model(**random_inputs(model), **{argument: prefix_cache(torch.randn(2, 2, 2, 1, 16), 3)})


# ---- unknown layouts ---------------------------------------------------------------------------------------
def _embeddings_forward_without_position_ids(self, input_ids=None, token_type_ids=None, inputs_embeds=None,
                                             cache_length=0):
    raise AssertionError("ran")


def _attention_forward_without_kwargs(self, hidden_states, attention_mask=None, cache=None):
    raise AssertionError("ran")


def _deberta_attention_forward_with_new_argument(self, hidden_states, attention_mask, output_attentions=False,
                                                 query_states=None, relative_pos=None, rel_embeddings=None,
                                                 new_option=None):
    raise AssertionError("ran")


class _OtherSelfAttention(modeling_bert.BertSelfAttention):
    pass


class _OtherElectraModel(modeling_electra.ElectraModel):
    pass


def _swap_attention_class(model):
    model.bert.encoder.layer[1].attention.self.__class__ = _OtherSelfAttention


def _remove_attention_config(model):
    del model.bert.encoder.layer[0].attention.self.config


def _remove_electra_attention_projection(model):
    del model.electra.encoder.layer[0].attention.self.key


def _remove_deberta_attribute(model):
    del model.deberta.encoder.layer[1].attention.self.q_bias


LAYOUTS = {
    # name: (family, class patches [(owner, attribute, value)], instance change, expected message)
    "embeddings without position_ids": ("bert", [(modeling_bert.BertEmbeddings, "forward",
                                                  _embeddings_forward_without_position_ids)], None,
                                        r"BertEmbeddings.forward takes no argument position_ids"),
    "roberta embeddings class renamed": ("roberta", [(modeling_roberta, "RobertaEmbeddings", None)], None,
                                         r"modeling_roberta has no class RobertaEmbeddings"),
    "xlm-roberta self-attention class renamed": ("xlm-roberta", [(modeling_xlm_roberta, "XLMRobertaSelfAttention",
                                                                   None)], None,
                                                 r"modeling_xlm_roberta has no class XLMRobertaSelfAttention"),
    "electra base model of another class": ("electra", [(modeling_electra, "ElectraModel", _OtherElectraModel)], None,
                                            r"the base model is a .*ElectraModel, expected .*_OtherElectraModel"),
    "electra attention without its key projection": ("electra", [], _remove_electra_attention_projection,
                                                     r"ElectraSelfAttention \(layer 0\) .* has no attribute key"),
    "attention forward without **kwargs": ("bert", [(modeling_bert.BertSelfAttention, "forward",
                                                     _attention_forward_without_kwargs)], None,
                                           r"BertSelfAttention.forward takes no \*\*kwargs"),
    "another self-attention class": ("bert", [], _swap_attention_class,
                                     r"encoder.layer\[1\].attention.self is a .*_OtherSelfAttention, expected "
                                     r".*BertSelfAttention"),
    "attention without config": ("bert", [], _remove_attention_config, r"BertSelfAttention \(layer 0\) has no config"),
    "deberta attention with a new argument": ("v1", [(modeling_deberta.DisentangledSelfAttention, "forward",
                                                      _deberta_attention_forward_with_new_argument)], None,
                                              r"DisentangledSelfAttention.forward has the signature \(.*new_option\)"),
    "deberta attention without q_bias": ("v1", [], _remove_deberta_attribute,
                                         r"DisentangledSelfAttention \(layer 1\) .* has no attribute q_bias"),
}


def _family_model(family):
    if family in FAMILIES:
        model = tiny_model(family)
        return model, random_inputs(model)
    model = deberta_tests.tiny_model(family)
    return model, deberta_tests.random_inputs(model)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_unknown_layout_is_refused_at_patch_time(layout, monkeypatch):
    family, patches, change, message = LAYOUTS[layout]
    model, inputs = _family_model(family)
    logits = model(**inputs).logits
    if change is not None:
        change(model)
    before = snapshot(model)
    for owner, attribute, value in patches:
        if value is None:
            monkeypatch.delattr(owner, attribute)
        else:
            monkeypatch.setattr(owner, attribute, value)
    with pytest.raises(RuntimeError, match=rf"transformers {VERSION}: .*{message}.*{RANGE}"):
        patch_model(model, PREFIX_LEN)
    monkeypatch.undo()
    if change is None:  # the model still runs, unchanged
        assert_unchanged(model, before, inputs, logits)
    else:
        assert snapshot(model)["hooks"] == before["hooks"] and not hasattr(model, "prefix_encoder")


class _BypassedInterface(dict):
    """An ``ALL_ATTENTION_FUNCTIONS`` that always hands out the module's own eager attention."""

    def get_interface(self, name, default):
        return default

    def __getitem__(self, name):
        return modeling_bert.eager_attention_forward


def test_attention_that_bypasses_the_interface_fails_the_forward(monkeypatch):
    """A transformers whose self-attention stopped calling the AttentionInterface would silently drop the prefix:
    the forward raises instead of returning."""
    model = tiny_model("bert")
    patch_model(model, PREFIX_LEN)
    monkeypatch.setattr(modeling_bert, "ALL_ATTENTION_FUNCTIONS", _BypassedInterface())
    with pytest.raises(RuntimeError, match=rf"transformers {VERSION}: the self-attention of layer\(s\) \[0, 1\] of "
                                           rf"BertModel did not run through the patched attention.*{RANGE}"):
        model(**random_inputs(model))


# ---- pickle, torch.save, deepcopy --------------------------------------------------------------------------
def _torch_round_trip(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIES = {"pickle": lambda m: pickle.loads(pickle.dumps(m)), "torch.save": _torch_round_trip,
          "deepcopy": copy.deepcopy}


@pytest.mark.parametrize("how", COPIES)
@pytest.mark.parametrize("family", ["bert", "roberta", "electra", "v1", "v2-share-buckets"])
def test_patched_model_copies(family, how):
    """Identical logits (a bank, prompt depth, eval), the copy owns its prefix and state, and unpatches alone."""
    model, inputs = _family_model(family)
    plain_logits = model(**inputs).logits
    encoder = patch_model(model, PREFIX_LEN, layers=[1], num_tasks=2)
    with torch.no_grad():
        encoder.prefix.normal_()
    task_ids = torch.tensor([1, 0, 1])
    logits = model(**inputs, task_ids=task_ids).logits
    clone = COPIES[how](model)
    assert patch_state(clone).family is patch_state(model).family  # the registered family, not a copy of it
    assert torch.equal(clone(**inputs, task_ids=task_ids).logits, logits)
    with torch.no_grad():
        clone.prefix_encoder.prefix.add_(1.0)
    assert not torch.allclose(clone(**inputs, task_ids=task_ids).logits, logits)
    assert torch.equal(model(**inputs, task_ids=task_ids).logits, logits)
    unpatch_model(clone)
    assert torch.equal(clone(**inputs).logits, plain_logits)
    assert torch.equal(model(**inputs, task_ids=task_ids).logits, logits)


def test_torch_load_in_a_fresh_process(tmp_path):
    """The registered attention name is there again in a new process (unpickling imports ptv2_kernels)."""
    model = tiny_model("roberta")
    encoder = patch_model(model, PREFIX_LEN)
    with torch.no_grad():
        encoder.prefix.normal_()
    inputs = random_inputs(model)
    torch.save({"model": model, "inputs": inputs, "logits": model(**inputs).logits}, tmp_path / "saved.pt")
    script = ("import sys, torch\n"
              "saved = torch.load(sys.argv[1], weights_only=False)\n"
              "assert torch.equal(saved['model'](**saved['inputs']).logits, saved['logits'])\n"
              "print('same logits')\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "saved.pt")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and "same logits" in done.stdout, done.stderr[-2000:]


def test_pyproject_states_the_supported_range():
    """pyproject.toml's dependency is the range patch_model checks (and .ci/run tests the floor of)."""
    import tomllib
    from pathlib import Path

    from ptv2_kernels.patching import compat

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert f"transformers{compat.SUPPORTED_RANGE}" in project["dependencies"]
