"""`rr compare`'s table and trade-off plot from method results (no model needed)."""

from rr.evaluation.report import score_error, compare_rows, plot_tradeoff, write_compare_table


def _evaluation(passed: int, correct: int, perplexity: float) -> dict:
    from rr.evaluation.metrics import wilson_interval

    return {"forget_score": passed / 40, "utility_score": correct / 120,
            "metrics": {"pass@1": passed / 40, "arithmetic_accuracy": correct / 120, "perplexity": perplexity},
            "intervals": {"pass@1": list(wilson_interval(passed, 40)),
                          "arithmetic_accuracy": list(wilson_interval(correct, 120))}}


ROWS = [
    {"method": "base", "test": _evaluation(10, 28, 18.7), "wall_time_s": None, "details": {}},
    {"method": "reveal-release", "test": _evaluation(0, 25, 23.0), "wall_time_s": None,
     "details": {"ledger": [{"merge_weight": -2.0, "kind": "forget"}, {"merge_weight": 0.3, "kind": "retain"}]}},
    {"method": "pem-negation", "test": _evaluation(0, 7, 20.4), "wall_time_s": 812.4,
     "details": {"merge_weight": -2.0, "rule": "forget_target"}},
    {"method": "ga+gd", "test": _evaluation(4, 20, 30.1), "wall_time_s": 95.0,
     "details": {"steps": 30, "weights": "lora", "learning_rate": 1e-4}},
    {"method": "icu", "test": _evaluation(9, 30, 18.6), "wall_time_s": 626.0,
     "details": {"steps": 30, "weights": "lora", "similarity": "embedder-cosine", "remaining_forget_samples": 120}},
    {"method": "rmu", "test": _evaluation(8, 27, 18.9), "wall_time_s": 25.0,
     "details": {"steps": 30, "layer": 7, "steering_coefficient": 300.0}},
    {"method": "ext-sub", "test": _evaluation(6, 30, 19.5), "wall_time_s": 410.0,
     "details": {"alpha": 2.0, "rule": "relative_drop"}},
]
DATA = {"source": "self-generated", "forget_examples": 120, "forget_sha256": "ab" * 32, "retain_examples": 64}


def test_rows_carry_scores_intervals_wall_time_and_what_was_applied():
    header, rows = compare_rows(ROWS)
    assert header == ["method", "forget_score", "utility_score", "arithmetic_accuracy", "pass@1", "perplexity",
                      "wall_time_s", "applied"]
    by_method = {row[0]: dict(zip(header, row)) for row in rows}
    assert by_method["base"]["pass@1"] == "0.2500 [0.142, 0.402]"
    assert by_method["base"]["wall_time_s"] == ""
    assert by_method["reveal-release"]["wall_time_s"] == "not recorded"
    assert by_method["reveal-release"]["applied"] == "ledger -2·F, +0.3·R"
    assert by_method["pem-negation"]["wall_time_s"] == "812"
    assert by_method["pem-negation"]["applied"] == "weight -2 (forget_target)"
    assert by_method["ga+gd"]["applied"] == "30 steps, lora, lr 0.0001"
    assert by_method["ga+gd"]["perplexity"] == "30.1000"
    # every family says what it applied from the details it records (ICU has no lr there, RMU no LoRA)
    assert by_method["icu"]["applied"] == "30 steps, lora, forget samples left 120"
    assert by_method["rmu"]["applied"] == "30 steps, layer 7, c 300"
    assert by_method["ext-sub"]["applied"] == "α 2 (relative_drop)"


def test_table_files_and_plot(tmp_path):
    csv_path, md_path = write_compare_table(ROWS, tmp_path, "code: embedded:smollm2", DATA)
    assert len(csv_path.read_text().splitlines()) == 1 + len(ROWS)
    text = md_path.read_text()
    assert "120 examples, sha256 abababababababab" in text and "64 retain examples" in text
    assert text.count("\n| ") == 1 + len(ROWS)  # header and one row per method (the separator starts "|-")
    png = plot_tradeoff(ROWS, tmp_path / "tradeoff.png", "code")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_error_bars_come_from_the_rate_behind_each_score():
    evaluation = ROWS[0]["test"]
    low, high = score_error(evaluation, "forget_score")
    assert (evaluation["forget_score"] - low, evaluation["forget_score"] + high) == \
        tuple(evaluation["intervals"]["pass@1"])
    no_rate = {"forget_score": 0.3, "utility_score": 0.05, "metrics": {"perplexity": 20.0}, "intervals": {}}
    assert score_error(no_rate, "utility_score") is None
