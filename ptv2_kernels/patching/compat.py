"""The transformers versions ``patch_model`` supports, and the patch-time checks of every transformers name and
layout that the patch still relies on beyond the public extension points (``position_ids``, hooks,
``AttentionInterface``).

Each check raises :class:`LayoutError` (a ``RuntimeError``) naming the installed transformers version, the piece
that is missing or different, and the supported range, before anything is patched: a layout the patch does not
recognise never runs.
"""

import inspect
from typing import Iterable

import transformers
from packaging.version import Version

FLOOR = "5.0.0"
CEILING = "6"
SUPPORTED_RANGE = f">={FLOOR},<{CEILING}"  # the same range as pyproject.toml's dependency


class LayoutError(RuntimeError):
    """The installed transformers lacks (or changed) something the patch relies on."""

    def __init__(self, piece: str):
        super().__init__(f"transformers {transformers.__version__}: {piece}. ptv2_kernels.patch_model supports "
                         f"transformers{SUPPORTED_RANGE}; install a version in that range")


def check_version() -> None:
    """LayoutError unless the installed transformers lies in :data:`SUPPORTED_RANGE`."""
    installed = Version(transformers.__version__)
    if not Version(FLOOR) <= installed < Version(CEILING):
        raise LayoutError("this version is outside the supported range")


def _parameters(function, where: str) -> dict:
    try:
        return dict(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        raise LayoutError(f"{where} has no inspectable signature") from None


def require_parameters(function, names: Iterable[str], where: str) -> None:
    """``function`` takes every parameter in ``names`` by keyword."""
    parameters = _parameters(function, where)
    missing = [name for name in names if name not in parameters
               or parameters[name].kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.VAR_POSITIONAL)]
    if missing:
        raise LayoutError(f"{where} takes no argument {', '.join(missing)} (its signature is "
                          f"({', '.join(parameters)}))")


def require_exact_parameters(function, names: Iterable[str], where: str) -> None:
    """``function``'s parameters (``self`` excluded) are exactly ``names``, in order: for a method whose
    ``forward`` the patch replaces, so that a new argument (a new meaning) is never ignored."""
    parameters = [name for name in _parameters(function, where) if name != "self"]
    if parameters != list(names):
        raise LayoutError(f"{where} has the signature ({', '.join(parameters)}), expected ({', '.join(names)})")


def require_var_keyword(function, where: str) -> None:
    """``function`` takes ``**kwargs`` (it passes extra keyword arguments down to the attention)."""
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in _parameters(function, where).values()):
        raise LayoutError(f"{where} takes no **kwargs, so the prefix cannot reach the attention layers")


def require_attributes(obj, names: Iterable[str], where: str) -> None:
    """``obj`` has every attribute in ``names``."""
    missing = [name for name in names if not hasattr(obj, name)]
    if missing:
        raise LayoutError(f"{where} ({type(obj).__name__}) has no attribute {', '.join(missing)}")


def require_instance(obj, cls: type, where: str) -> None:
    """``obj`` is a ``cls`` (exactly, not a subclass that may override its forward)."""
    if type(obj) is not cls:
        raise LayoutError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, expected "
                          f"{cls.__module__}.{cls.__qualname__}")


def require_module_class(module, name: str, where: str) -> type:
    """The class ``name`` of the transformers module ``module`` (e.g. ``BertSelfAttention``)."""
    cls = getattr(module, name, None)
    if not isinstance(cls, type):
        raise LayoutError(f"{module.__name__} has no class {name} ({where})")
    return cls
