"""The suite fails on our own deprecated calls into transformers and PEFT, and only on ours (tests/conftest.py)."""

import warnings

import pytest
import transformers

from .prefix_references import enable_activation_checkpointing
from .test_patch_bert import tiny_model


def library_function(module: str, body: str):
    """A function whose frame belongs to the module named ``module`` (as if defined in that library)."""
    namespace = {"__name__": module, "warnings": warnings}
    exec(f"def function(callback=None):\n    {body}\n", namespace)  # noqa: S102  (a fixed test snippet)
    return namespace["function"]


@pytest.mark.parametrize("category", [FutureWarning, DeprecationWarning])
@pytest.mark.parametrize("library", ["transformers.modeling_utils", "peft.peft_model"])
def test_a_deprecation_we_cause_fails(library, category):
    deprecated = library_function(library, f"warnings.warn('old name', {category.__name__}, stacklevel=1)")
    with pytest.raises(category, match="old name"):
        deprecated()


def test_third_party_noise_does_not_fail():
    """transformers warning about a call PEFT made, or a warning outside transformers/PEFT: recorded, not raised."""
    deprecated = library_function("transformers.modeling_utils", "warnings.warn('old name', FutureWarning)")
    caller = library_function("peft.tuners", "callback()")
    caller(deprecated)
    other = library_function("torch.jit", "warnings.warn('old name', DeprecationWarning)")
    other()
    user_warning = library_function("transformers.modeling_utils", "warnings.warn('advice', UserWarning)")
    user_warning()


@pytest.mark.skipif(not hasattr(transformers.PreTrainedModel, "activation_checkpointing_enable"),
                    reason="gradient_checkpointing_enable is not deprecated before transformers 5.23")
def test_the_old_checkpointing_name_fails_and_the_new_one_runs():
    model = tiny_model("bert")
    with pytest.raises(FutureWarning, match="activation_checkpointing_enable"):
        model.gradient_checkpointing_enable()
    enable_activation_checkpointing(model)
    assert model.is_activation_checkpointing
