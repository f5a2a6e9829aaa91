"""Import ptv2_kernels before anything imports triton: on a machine without a GPU it switches Triton to
its interpreter (TRITON_INTERPRET=1), which Triton only reads at import.

Then make our own deprecated calls into transformers and PEFT fail the test that makes them, so the next
rename shows up a release before it breaks us. pytest's ``filterwarnings`` cannot say "caused by our call":
transformers attributes its deprecation warnings to its own wrapper frames (``modeling_utils.py``,
``output_capturing.py``), not to the caller. So :func:`_our_deprecated_calls_fail` looks at the live stack when a
``FutureWarning``/``DeprecationWarning`` issued by transformers or PEFT is shown: walking out of the issuing
library (and torch's module-call plumbing), the first frame decides. Ours (``ptv2_kernels``, ``tests``): the
warning is raised as an error there. Another library's (PEFT calling a deprecated transformers API, say) or an
import's (a library warning about the installed versions): third-party noise, recorded as usual. A test that
means to make a deprecated call says so with ``@pytest.mark.filterwarnings("ignore:...")`` or ``pytest.warns``.
"""

import sys
import warnings

import pytest

import ptv2_kernels  # noqa: F401

OURS = {"ptv2_kernels", "tests"}
WATCHED = {"transformers", "peft"}  # the libraries whose deprecations we must hear about
PLUMBING = {"torch", "functools", "contextlib", "warnings"}  # frames between a caller and the library it calls


def _package(frame) -> str:
    return frame.f_globals.get("__name__", "").split(".")[0]


def caused_by_our_call(frame) -> bool:
    """Whether the warning being shown at ``frame`` (``warnings`` machinery on top) was issued by a watched library
    (:data:`WATCHED`) called directly from our code."""
    while frame is not None and _package(frame) == "warnings":
        frame = frame.f_back
    issuer = frame and _package(frame)
    if issuer not in WATCHED:
        return False
    while frame is not None and _package(frame) in PLUMBING | {issuer}:
        frame = frame.f_back
    return frame is not None and _package(frame) in OURS


@pytest.fixture(autouse=True)
def _our_deprecated_calls_fail(monkeypatch):
    """Within each test: a deprecation warning from transformers or PEFT that our call caused raises (see above)."""
    show = warnings.showwarning

    def check(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, (DeprecationWarning, FutureWarning)) and caused_by_our_call(sys._getframe(1)):
            raise message if isinstance(message, Warning) else category(message)
        show(message, category, filename, lineno, file, line)

    monkeypatch.setattr(warnings, "showwarning", check)
