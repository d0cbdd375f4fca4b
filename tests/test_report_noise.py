"""`qlaunch report` says how sure it is (#33, finding 5): every configured metric in report.md and
report.html with a 95% interval, and the top two runs compared example by example, so a lead
within sampling noise reads as one ("No clear winner …") instead of a bare "★ best".

The run folders are written as the jobs leave them (tests/recorded_runs.py), nothing trains.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import recorded_runs as rr

from launcher.json_output import ReportDocument

METRICS = ("json_match", "json_match_fenced", "format_match")


def qlaunch(*args, home, **env):
    environment = {key: value for key, value in os.environ.items() if key != "COLUMNS"}
    environment.update(QLAUNCH_HOME=str(home), **env)
    return subprocess.run(
        [sys.executable, "-m", "launcher.cli", *args], capture_output=True, text=True, env=environment, timeout=300
    )


def answers(right: list[int], n: int = 40) -> list[str]:
    """Example i answered right (json_match) when i is in `right`; the others are fenced JSON
    (right for json_match_fenced only) or a wrong value of the right shape (format_match)."""
    return [rr.RIGHT if i in right else (rr.FENCED if i % 2 else rr.WRONG_VALUE) for i in range(n)]


def grid(folder, leader_right, other_right, leader_eval=0.91, other_eval=0.87):
    path = rr.experiment(folder, {"train.learning_rate": [1e-4, 2e-4]})
    leader, other = rr.runs(path)
    rr.trained(leader, [1.3, 1.0, 0.97], eval_loss=leader_eval)
    rr.trained(other, [1.2, 0.9, 0.86], eval_loss=other_eval)
    rr.inferred(leader, answers(leader_right))
    rr.inferred(other, answers(other_right))
    return path, leader, other


def test_wilson_interval_and_exact_sign_test_known_values():
    from launcher.report_stats import sign_test, wilson

    low, high = wilson(30, 40)
    assert (round(low, 3), round(high, 3)) == (0.598, 0.858)
    assert wilson(0, 10)[0] == pytest.approx(0.0) and 0.0 < wilson(0, 10)[1] < 0.31  # not a zero-width interval at 0/n
    assert wilson(10, 10)[1] == pytest.approx(1.0) and wilson(10, 10)[0] > 0.69
    assert sign_test(5, 2) == pytest.approx(58 / 128)  # 2 × P(X ≤ 2), X ~ Bin(7, ½)
    assert sign_test(12, 2) == pytest.approx(2 * (1 + 14 + 91) / 2**14)
    assert sign_test(0, 0) == 1.0


def test_a_lead_within_noise_is_said_in_a_sentence_not_crowned(tmp_path):
    """The issue's case: 30 vs 27 right of 40 (0.75 vs 0.675), the "best" run with the higher
    eval loss. Paired: 25 both right, 5 only the leader, 2 only the runner-up → p = 0.45."""
    shared = set(range(25))
    path, leader, other = grid(tmp_path, shared | {25, 26, 27, 28, 29}, shared | {30, 31})
    out = tmp_path / "out"
    result = qlaunch("report", str(path), "-o", str(out), "--json", home=tmp_path / "home")
    assert result.returncode == 0, result.stderr
    document = ReportDocument.model_validate_json(result.stdout)
    assert document.best_run == leader.run_id  # still the top of the ranking (compatible)…
    comparison = document.comparison
    assert (comparison.leader, comparison.runner_up, comparison.n) == (leader.run_id, other.run_id, 40)
    assert (comparison.leader_only, comparison.runner_up_only) == (5, 2)
    assert comparison.p_value == pytest.approx(0.4531, abs=1e-4) and comparison.within_noise  # …but not a winner
    assert (comparison.leader_score, comparison.runner_up_score) == (0.75, 0.675)
    top = document.runs[0]
    assert [i.name for i in top.intervals] == list(METRICS)
    headline = top.intervals[0]
    assert (headline.tuned, round(headline.tuned_low, 3), round(headline.tuned_high, 3)) == (0.75, 0.598, 0.858)

    markdown, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    for text in (markdown, html):
        assert "★ best" not in text
        assert "No clear winner on json_match" in text and "within sampling noise" in text
        assert "p = 0.45" in text
        assert f"{leader.run_id} also has the higher eval loss (0.9100 vs 0.8700)" in text
        for metric in METRICS:  # every configured metric, with its interval
            assert f"{metric} base → tuned (95%)" in text, metric
        assert "0.00 → 0.75 (0.60–0.86)" in text and "0.00 → 0.68 (0.52–0.80)" in text
    assert f"| 1 (within noise) | {leader.run_id} |" in markdown

    terminal = qlaunch("report", str(path), "-o", str(out), home=tmp_path / "home")
    assert terminal.returncode == 0, terminal.stderr
    assert "top run (lead within noise)" in terminal.stdout and "No clear winner" in terminal.stdout


def test_a_clear_lead_is_crowned_with_its_evidence(tmp_path):
    path, leader, other = grid(tmp_path, set(range(36)), set(range(12)), leader_eval=0.80, other_eval=0.95)
    out = tmp_path / "out"
    result = qlaunch("report", str(path), "-o", str(out), "--json", home=tmp_path / "home")
    assert result.returncode == 0, result.stderr
    document = ReportDocument.model_validate_json(result.stdout)
    assert document.comparison.within_noise is False and document.comparison.p_value < 0.001
    markdown, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    for text in (markdown, html):
        assert "★ best" in text and f"{leader.run_id} is best on json_match: 0.90 vs 0.30" in text
        assert "higher eval loss" not in text and "No clear winner" not in text
    assert f"| ★ best | {leader.run_id} |" in markdown


def test_report_without_per_example_answers_compares_intervals(tmp_path):
    """Kubernetes without the claim: only the summaries (infer_end events) are readable, so the
    report says there is no paired test and compares the intervals."""
    path, leader, other = grid(tmp_path, set(range(30)), set(range(27)))
    for run in (leader, other):
        (rr.RunPaths.of(run).inference / "results.jsonl").unlink()
    result = qlaunch("report", str(path), "-o", str(tmp_path / "out"), "--json", home=tmp_path / "home")
    document = ReportDocument.model_validate_json(result.stdout)
    assert document.comparison is None
    assert "no paired test" in document.verdict and "overlap: the lead may be sampling noise" in document.verdict
    assert [i.name for i in document.runs[0].intervals] == list(METRICS)  # from summary.json's means and n
    assert "1 (within noise)" in (tmp_path / "out" / "report.md").read_text()


def test_report_and_status_print_on_a_terminal_that_is_not_utf8(tmp_path):
    """PYTHONIOENCODING=ascii (a C-locale ssh session, an old CI runner): no traceback, arrows
    spelled in ASCII (#33, finding 10)."""
    path, _, _ = grid(tmp_path, set(range(30)), set(range(27)))
    home = tmp_path / "home"
    for args in (("report", str(path), "-o", str(tmp_path / "out")), ("status", str(path))):
        result = qlaunch(*args, home=home, PYTHONIOENCODING="ascii", COLUMNS="120")
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
        assert "0.00 -> 0.75" in result.stdout, result.stdout
        result.stdout.encode("ascii")
    assert json.loads((tmp_path / "out" / "report.json").read_text())["comparison"]["within_noise"] is True


def test_a_grid_ranked_by_training_loss_crowns_nobody(tmp_path):
    """Before inference has scored anything the runs are ranked by final training loss, one
    batch's loss: the top row says so instead of "★ best"."""
    path = rr.experiment(tmp_path, {"train.learning_rate": [1e-4, 2e-4]})
    first, second = rr.runs(path)
    rr.trained(first, [1.3, 1.0, 0.97])
    rr.trained(second, [1.2, 0.9, 0.86])
    result = qlaunch("report", str(path), "-o", str(tmp_path / "out"), home=tmp_path / "home")
    assert result.returncode == 0, result.stderr
    assert f"lowest final loss: {second.run_id}" in result.stdout and "best run" not in result.stdout
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert f"| 1 (lowest loss) | {second.run_id} |" in markdown and "★" not in markdown
    assert "No inference metrics yet" in markdown


def test_runs_that_answer_alike_are_a_tie_said_as_one(tmp_path):
    path, leader, other = grid(tmp_path, set(range(20)), set(range(20)), leader_eval=0.9, other_eval=0.9)
    result = qlaunch("report", str(path), "-o", str(tmp_path / "out"), "--json", home=tmp_path / "home")
    document = ReportDocument.model_validate_json(result.stdout)
    assert document.comparison.within_noise and document.comparison.p_value == 1.0
    first, second = (r.run_id for r in document.runs)  # equal scores: the lower final loss ranks first
    assert document.verdict.startswith(
        f"No clear winner on json_match: {first} and {second} score the same on "
        "every one of the 40 held-out examples both answered (0.50)"
    )
