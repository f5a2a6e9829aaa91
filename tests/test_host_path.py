"""The eager host path (issue 23): eager calls skip the registered op, structural checks run once per
structure (value checks every call), a patched model checks once per forward, and backend names map to the
modules that run them (old names still accepted). Outputs against the float64 reference live in the kernel
tests; these check the path a call takes and that no check is lost on the way."""

import pytest
import torch

from ptv2_kernels import patch_model, prefix_attention
from ptv2_kernels.ops import dispatch, library, validation
from ptv2_kernels.ops import prefix_attention as op_module
from ptv2_kernels.ops.prefix_attention import resolve_backend
from ptv2_kernels.patching import base as patching_base

from . import test_patch_bert as bert
from .reference import reference_attention
from .test_prefix_attention import make_inputs


def test_eager_calls_skip_the_registered_op(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the registered op ran in eager mode")

    monkeypatch.setattr(library, "prefix_attention_fwd", fail)
    tensors, mask, _, d_out = make_inputs(2, 2, 5, 3, 16, torch.float64, padded_rows=((1, 3),), device="cpu")
    leaves = [t.detach().requires_grad_() for t in tensors]
    out = prefix_attention(*leaves, key_padding_mask=mask, backend="torch-ref")
    out.backward(d_out)
    want = reference_attention(*[t.detach() for t in tensors], mask)
    torch.testing.assert_close(out, want)
    assert all(t.grad is not None for t in leaves)


def test_a_known_structure_still_checks_values():
    """The second call of a structure skips the structural checks, never the value checks."""
    validation.PASSED.clear()
    tensors, mask, task_ids, _ = make_inputs(2, 2, 5, 3, 16, torch.float32, tasks=3, padded_rows=((1, 3),),
                                             device="cpu")
    prefix_attention(*tensors, key_padding_mask=mask, task_ids=task_ids)
    assert len(validation.PASSED._keys) == 1
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 3\)"):
        prefix_attention(*tensors, key_padding_mask=mask, task_ids=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="dropout_p must be in"):
        prefix_attention(*tensors, key_padding_mask=mask, task_ids=task_ids, dropout_p=1.5)
    with pytest.raises(TypeError, match="key_padding_mask must be a bool tensor"):  # another structure
        prefix_attention(*tensors, key_padding_mask=mask.long(), task_ids=task_ids)
    assert len(validation.PASSED._keys) == 1


def test_structural_checks_run_once_per_structure(monkeypatch):
    validation.PASSED.clear()
    calls = []
    original = validation.check_prefix
    monkeypatch.setattr(validation, "check_prefix", lambda *a: calls.append(1) or original(*a))
    tensors, mask, _, _ = make_inputs(1, 2, 4, 2, 16, torch.float32, padded_rows=((0, 3),), device="cpu")
    for _ in range(3):
        prefix_attention(*tensors, key_padding_mask=mask)
    prefix_attention(*[t.transpose(1, 2).contiguous().transpose(1, 2) for t in tensors[:3]], *tensors[3:],
                     key_padding_mask=mask)  # other strides: a new structure, checked
    assert calls == [1, 1]


def test_a_patched_model_checks_once_per_forward(monkeypatch):
    checked = []
    original = op_module._check_padded
    monkeypatch.setattr(op_module, "_check_padded", lambda *a, **k: checked.append(1) or original(*a, **k))
    model = bert.tiny_model("bert")
    patch_model(model, 3)
    layers = model.config.num_hidden_layers
    assert layers > 1
    inputs = bert.random_inputs(model)
    out = model(**inputs).logits
    assert checked == [1]
    checked.clear()
    with monkeypatch.context() as m:  # without the per-forward checks: one full check per layer, same result
        m.setattr(patching_base, "prefix_attention", lambda *a, **k: op_module.prefix_attention(*a, **k))
        again = model(**inputs).logits
    assert len(checked) == layers
    torch.testing.assert_close(out, again, rtol=0, atol=0)


def test_backend_names_say_what_runs():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "cpu" and resolve_backend("torch", cpu) == "cpu"
    assert resolve_backend("torch", torch.device("meta")) == "torch-ref"
    with pytest.raises(ValueError, match="backend='cpu' needs CPU tensors"):
        resolve_backend("cpu", torch.device("meta"))
    with pytest.raises(ValueError, match=r"backend must be one of .* \(or the old name 'torch'\), got 'gpu'"):
        resolve_backend("gpu", cpu)
    for name, entry in dispatch.BACKENDS.items():  # each string leads to ops/<module>.py and its two passes
        assert entry.module.replace("_backend", "").replace("_", "-") == name
        if name in ("cpu", "torch-ref", "cuda"):
            assert callable(dispatch.forward(name)) and callable(dispatch.backward(name))
