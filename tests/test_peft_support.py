"""What PEFT can prefix-tune, found by trying it (``ptv2_kernels.peft_support``): the probe sees a refusal, the
README's table of version ranges is true for the installed PEFT and transformers, and the bench's reference follows
the probe. CI runs this at both ends of the ranges (PEFT 0.21.0 with transformers 5.0.0, and the newest of both)."""

import re
import sys
from pathlib import Path

import peft
import pytest
import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from ptv2_kernels import peft_support
from ptv2_kernels.bench import model as bench_model

README = Path(__file__).resolve().parent.parent / "README.md"
COLUMNS = {"BERT, RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA": ("bert", "roberta", "xlm-roberta", "camembert", "electra"),
           "DeBERTa, DeBERTa-v2/v3": ("deberta", "deberta-v2")}
ANSWERS = {"yes": True, "no": False}


@pytest.fixture
def fresh_probe():
    """The probe's per-process cache emptied before and after (a test that changes what PEFT sees)."""
    peft_support.peft_prefix_tuning_refusal.cache_clear()
    peft_support.peft_written_fields.cache_clear()
    yield peft_support.peft_prefix_tuning_refusal
    peft_support.peft_prefix_tuning_refusal.cache_clear()
    peft_support.peft_written_fields.cache_clear()


def readme_table() -> list:
    """``[(peft SpecifierSet, transformers SpecifierSet, {model_type: can prefix-tune})]`` from the README."""
    lines = README.read_text().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| PEFT | transformers |"))
    columns = [c.strip() for c in lines[header].strip("|").split("|")][2:]
    assert set(columns) == set(COLUMNS), columns
    rows = []
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        specs = [SpecifierSet(re.fullmatch(r"`(.+)`", cell).group(1)) for cell in cells[:2]]
        claims = {model_type: ANSWERS[answer] for column, answer in zip(columns, cells[2:])
                  for model_type in COLUMNS[column]}
        rows.append((*specs, claims))
    assert rows, "the README's PEFT table has no rows"
    return rows


def test_the_readme_states_what_the_installed_peft_does():
    installed = Version(peft.__version__), Version(transformers.__version__)
    rows = [claims for peft_range, transformers_range, claims in readme_table()
            if installed[0] in peft_range and installed[1] in transformers_range]
    assert len(rows) == 1, (f"the README's PEFT table has {len(rows)} rows for {peft_support.installed_versions()}: "
                            "try it (ptv2_kernels.peft_support) and state it there")
    found = {model_type: peft_support.peft_prefix_tuning_refusal(model_type) for model_type in rows[0]}
    assert {model_type: reason is None for model_type, reason in found.items()} == rows[0], found


def test_a_refusal_is_seen_with_peft_own_error(fresh_probe, monkeypatch):
    """A backbone forward without the cache argument PEFT looks for (what PEFT 0.21 sees on transformers >= 5.24)."""
    monkeypatch.setattr(transformers.BertModel, "forward", lambda self, input_ids=None, **kwargs: None)
    reason = fresh_probe("bert")
    assert reason.startswith(f"{peft_support.installed_versions()} refuses prefix tuning of 'bert': ValueError: ")
    assert bench_model.peft_refusal("bert-base") == reason
    assert bench_model.reference_provider("bert-base") == bench_model.CONCAT
    assert peft_support.peft_written_fields("SEQ_CLS") is None  # the adapter files fall back to the stated format


def test_no_peft_installed(fresh_probe, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    assert fresh_probe("bert") == f"PEFT not installed (transformers {transformers.__version__}) (pip install " \
                                  "'peft>=0.21')"


def test_where_peft_runs_the_bench_compares_with_it():
    refusal = peft_support.peft_prefix_tuning_refusal("bert")
    assert bench_model.reference_provider("bert-base") == ("peft" if refusal is None else bench_model.CONCAT)
    assert bench_model.peft_refusal("deberta-v3-base") == peft_support.peft_prefix_tuning_refusal("deberta-v2")
