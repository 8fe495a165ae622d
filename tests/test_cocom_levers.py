"""benchmarks.cocom_levers' tables (the benchmark itself trains SmolLM2 on CPKC and is run by hand)."""

from __future__ import annotations

import pytest

from benchmarks import cocom_levers
from peft_ctx.cocom import CocomConfig


def _record(stage, examples, right, wrong, ae, ae_wrong):
    return {
        "stage": stage,
        "examples": examples,
        "choice_accuracy": right,
        "choice_accuracy_wrong_passage": wrong,
        "autoencode_token_accuracy": ae,
        "autoencode_token_accuracy_wrong_passage": ae_wrong,
    }


def test_the_tables_show_each_point_and_the_test_rows_with_their_controls():
    results = [
        {
            "lever": "tokens_frozen",
            "records": [
                _record("untrained", 0, 0.68, 0.48, 0.212, 0.208),
                _record("QA", 400, 0.62, 0.46, 0.356, 0.326),
            ],
            "test": {"untrained": {"choice_accuracy": 0.44, "choice_accuracy_wrong_passage": 0.37}},
        }
    ]
    lines = cocom_levers.table(results).splitlines()
    assert lines[2] == "| tokens_frozen (untrained) | 0 | 68% | 48% | +20 | 21.2% | 20.8% |"
    assert lines[3] == "| tokens_frozen (QA) | 400 | 62% | 46% | +16 | 35.6% | 32.6% |"
    baselines = {"no_retrieval": {"label": "no retrieval", "choice_accuracy": 0.385}}
    rows = cocom_levers.test_table(results, baselines).splitlines()
    assert rows[2] == "| no retrieval | 38.5% | - | - | - | - |"
    assert rows[3] == "| tokens_frozen (untrained) | 44.0% | 37.0% | +7.0 | - | - |"


@pytest.mark.parametrize("lever", sorted(cocom_levers.LEVERS))
def test_every_lever_is_a_valid_cocom_config_and_stage(lever):
    fields, stage, about = cocom_levers.LEVERS[lever]
    CocomConfig(compression_rate=4, **fields)
    assert set(stage) <= {"learning_rate", "a_margin", "a_nll"} and about
