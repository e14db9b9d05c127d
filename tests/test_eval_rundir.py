"""Run directories without a model: the pinned configuration, record files
(fsynced appends, a cut last line repaired, completed keys), reports, and
the layouts of a LongBench run and a sweep."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from refreekv.eval.errors import ConfigMismatch, UsageError
from refreekv.eval.rundir import LONGBENCH, SWEEP, RunDir, read_records, write_record


def test_a_run_directory_pins_one_configuration(tmp_path):
    run_dir = RunDir(tmp_path / "run", LONGBENCH)
    config = {"model": "m", "options": {"budget": 0.5}}
    assert run_dir.check_config(config) is None and not run_dir.path.exists()  # checked, not created
    run_dir.pin({"config": config, "environment": {}})
    assert run_dir.check_config(config) == {"config": config, "environment": {}}
    with pytest.raises(ConfigMismatch, match=r"holds a run made with a different configuration:\n  options.budget: 0.5 there, 0.25 now"):
        run_dir.check_config({"model": "m", "options": {"budget": 0.25}})
    run_dir.pin_path.write_text("[1]")
    with pytest.raises(ConfigMismatch, match=r"config.json is unreadable .*; use another --output-dir"):
        run_dir.check_config(config)
    sweep = RunDir(tmp_path / "sweep", SWEEP)
    sweep.pin({"config": config})
    with pytest.raises(ConfigMismatch, match=r"sweep.json is unreadable \('points'\)"):
        sweep.check_config(config, ("config", "points"))


def test_a_pin_file_that_cannot_be_written_is_a_usage_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="cannot write"):
        RunDir(tmp_path / "file" / "run", LONGBENCH).pin({"config": {}})


def test_records_are_appended_and_a_cut_last_line_is_redone(tmp_path):
    run_dir = RunDir(tmp_path, LONGBENCH)
    for rank in (0, 1):
        with run_dir.open_records("trec", rank) as out:
            write_record(out, {"_id": f"r{rank}", "pred": "é"})
    path = run_dir.record_file("trec", 1)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('["not a record"]\n{"pred": "no id"}\n{"_id": "cut", "pr')
    assert run_dir.record_files("trec") == [run_dir.record_file("trec", 0), path]
    records, bad = run_dir.records("trec")
    assert [r["_id"] for r in records] == ["r0", "r1"]  # the cut line is neither a record nor a bad line
    assert [(line.line, line.error) for line in bad] == [(2, "a JSON list, not an object"), (3, "not a prediction record (missing _id)")]
    assert run_dir.completed(lambda r: r["_id"], "trec") == {"r0", "r1"}
    with run_dir.open_records("trec", 1) as out:  # the cut line goes before the next record
        write_record(out, {"_id": "cut", "pred": "again"})
    assert path.read_text(encoding="utf-8").splitlines()[-1] == '{"_id": "cut", "pred": "again"}'
    assert '"é"' in run_dir.record_file("trec", 0).read_text(encoding="utf-8")  # ensure_ascii=False


def test_a_sweep_keeps_its_records_in_one_file(tmp_path):
    sweep = RunDir(tmp_path, SWEEP)
    record = {"point": "fullkv", "method": "fullkv", "length": 512, "task": "niah_single", "_id": "a", "pred": "", "answers": []}
    with sweep.open_records() as out:
        write_record(out, record)
        write_record(out, {"_id": "b"})
    records, bad = read_records(tmp_path)
    assert records == [record] and sweep.record_files() == [tmp_path / "records.jsonl"]
    assert bad[0].error == "not a sweep record (missing point, method, length, task, pred, answers)"


def test_reports_are_named_per_rank_when_sharded(tmp_path):
    run_dir = RunDir(tmp_path, LONGBENCH)
    run_dir.write_report({"rank": 0})
    run_dir.write_report({"rank": 1}, rank=1, world=2)
    (tmp_path / "report.rank2.json").write_text("{cut")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.rank1.json", "report.rank2.json"]
    assert list(run_dir.reports()) == [{"rank": 0}, {"rank": 1}]
    assert json.loads((tmp_path / "report.json").read_text()) == {"rank": 0}


def test_reading_run_directories_loads_no_generation_code():
    """`compare` and `score` read run and sweep directories with this module
    alone: no transformers, no generation code (torch comes with the package)."""
    code = (
        "import sys; import refreekv.eval.rundir, refreekv.eval.scoring, refreekv.eval.compare; "
        "print(sorted(m for m in sys.modules if m.startswith('transformers') or m in "
        "('refreekv.eval.generation', 'refreekv.eval.runner', 'refreekv.eval.sweep')))"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
