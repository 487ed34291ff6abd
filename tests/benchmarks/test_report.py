"""The README's figures come from results files: the renderer fills its blocks and sentences from them."""

from __future__ import annotations

import json

import pytest

from benchmarks import report


def test_findings_are_filled_from_results_and_say_when_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    text = "".join(f"a <!-- finding:{n} -->old<!-- /finding:{n} --> b\n" for n in report.FINDINGS)
    out = report.fill_findings(text)
    assert "old" not in out and out.count("not measured yet") + out.count("Not measured yet") == 3
    pointing = {"conclusion": "Over 10 live seeds of 10, X.", "seeds": []}
    (tmp_path / "dinomx_pointing.json").write_text(json.dumps(pointing))
    (tmp_path / "dinomx_vs_lightly.json").write_text(json.dumps({"target_speed_vs_lightly": 1.5, "runs": [
        {"autocast_dtype": "float32", "target": {"wall": 1.13, "cpu": 1.22, "best_side": "dinomx", "met": False}},
        {"autocast_dtype": "torch.bfloat16", "target": {
            "wall": 1.6, "cpu": 1.55, "best_side": "dinomx (bf16 stream)", "met": True,
            "autocast_only": {"wall": 1.3, "cpu": 1.35, "best_side": "dinomx", "met": False}}}]}))
    out = report.fill_findings(out)
    assert "What was found: Over 10 live seeds of 10, X." in out
    assert "float32: 1.13x" in out and "target of 1.5x is met at torch.bfloat16; not met at float32" in out
    assert "torch.bfloat16: 1.60x" in out and "no bf16 stream, 1.30x wall" in out
    assert report.fill_findings(out) == out  # idempotent: a rerun changes nothing


def test_missing_marker_is_an_error():
    with pytest.raises(SystemExit, match="finding:distill"):
        report.fill_findings("no markers here")


def test_render_reads_every_results_file_in_the_repo():
    block = report.render()
    assert block.startswith(report.START) and block.endswith(report.END)


def _goal(best: str, gain: float, auc: float, met: bool) -> dict:
    return {"best_distilled": best, "distilled_acc": 0.80 + gain / 100, "against": "plain", "against_acc": 0.80,
            "gain_pt": gain, "auc_gain_pt": auc, "met": met}


def test_distill_finding_names_where_it_helps_most_and_why_not_on_the_demo_dataset(tmp_path, monkeypatch):
    from zoo.demo import DATASET

    monkeypatch.setattr(report, "RESULTS", tmp_path)
    assert "no distilled student" in report.finding_distill()
    paired = {"acc": {"mean": -0.01, "ci95": [-0.05, 0.03], "bootstrap95": [-0.03, 0.01]}}
    table = {"goal": {"a-mnist": _goal("kd-ens", 1.5, 0.3, True), "b-mnist": _goal("camkd", 2.5, 0.1, True),
                      DATASET: _goal("kd-ens", -1.0, -0.2, False)},
             "archs": {"resnet18": {
                 DATASET: {"methods": {"kd-ens": {"teacher_check": "stronger", "paired": paired, "acc": {"n": 3}}}},
                 "a-mnist": {"methods": {"kd-ens": {"acc": {"n": 3}}}},
                 "b-mnist": {"methods": {"camkd": {"acc": {"n": 4}}}}}}}
    (tmp_path / "medalmighty_table2.json").write_text(json.dumps(table))
    out = report.finding_distill()
    assert out.startswith("In Table 2, distillation helps most on b-mnist: `camkd` 0.825")
    assert "mean over 4 seeds" in out and "mean over 3 seeds" in out
    assert f"On the demo's {DATASET} it does not help" in out and "(-1.00 pt ACC, -0.20 pt AUC" in out
    assert "[-3.00, +1.00] pt, includes zero" in out  # the bootstrap interval, when the table has one
    table["archs"]["resnet18"][DATASET]["methods"]["kd-ens"]["teacher_check"] = "weaker"
    (tmp_path / "medalmighty_table2.json").write_text(json.dumps(table))
    assert "its teacher is weaker than the plain student" in report.finding_distill()


def test_demo_times_come_from_a_finished_demo_report(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    assert "not timed yet" in report.finding_demo_time()
    md = tmp_path / "report.md"
    md.write_text("# Demo report\n\n## 7. Serving\n\n- x: 3 s\n\n## Time\n\n- pretrain: 600 s\n- distil: 1200 s\n")
    with pytest.raises(ValueError, match="no total"):
        report.record_demo(md, "n")
    md.write_text(md.read_text() + "- total: 1800 s\n")
    report.record_demo(md, "On idle cores")
    assert json.loads((tmp_path / "demo_times.json").read_text())["times_s"] == {
        "pretrain": 600.0, "distil": 1200.0, "total": 1800.0}  # the Serving section's line is not a stage
    assert report.finding_demo_time() == "On idle cores: 30 min (pretrain 10.0, distil 20.0 min)."
    (tmp_path / "other.md").write_text("# not a demo report\n")
    with pytest.raises(ValueError, match="no '## Time' section"):
        report.record_demo(tmp_path / "other.md", "n")
