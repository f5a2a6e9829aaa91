"""The model families ``patch_model`` knows, by ``config.model_type``: the one table of them (as Liger-Kernel keeps
one table from model type to patch function). Adding a family is one module implementing
:class:`~ptv2_kernels.patching.base.ModelFamily` and one line here."""

import copyreg

from torch import nn

from .base import ModelFamily
from .bert import BERT, ROBERTA
from .deberta import DEBERTA, DEBERTA_V2
from .electra import ELECTRA
from .xlm_roberta import CAMEMBERT, XLM_ROBERTA

FAMILIES = {family.name: family for family in (BERT, ROBERTA, XLM_ROBERTA, CAMEMBERT, ELECTRA, DEBERTA, DEBERTA_V2)}


def _pickled_by_name(family: ModelFamily):
    """Pickles (patched models, their hooks) and deep copies refer to the registered family by its name."""
    return family_named, (family.name,)


for family_class in {type(family) for family in FAMILIES.values()}:
    copyreg.pickle(family_class, _pickled_by_name)


def _supported() -> str:
    return ", ".join(family.base_class for family in FAMILIES.values())


def family_named(model_type: str) -> ModelFamily:
    """The family of ``config.model_type``; ValueError naming the supported ones for another."""
    family = FAMILIES.get(model_type)
    if family is None:
        raise ValueError(f"model type {model_type!r} is not a supported family ({', '.join(FAMILIES)})")
    return family


def family_of(model: nn.Module) -> ModelFamily:
    """The family of a transformers ``model`` (any task head), by its config's ``model_type``; TypeError for a
    model of another family. Its layout is checked by ``family.check_layout(model.base_model)``."""
    config = getattr(model, "config", None)
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is None or not isinstance(model, nn.Module):
        base = getattr(model, "base_model", None)
        raise TypeError(f"patch_model supports transformers models built on {_supported()} (any task head); got "
                        f"{type(model).__name__} (base model {type(base).__name__})")
    return family
