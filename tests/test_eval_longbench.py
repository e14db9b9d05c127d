"""LongBench end to end on a tiny random Llama and fixture tasks: run,
interrupt, resume, score, compare, sharding, and bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from eval_fixtures import TREC_CLASSES, save_tiny_model, with_settings, write_fixture_data

from refreekv.eval import runner
from refreekv.eval.data import Sample
from refreekv.eval.generation import sample_record
from refreekv.eval.longbench import main
from refreekv.eval.metrics import sample_score
from refreekv.eval.options import coerce_option
from refreekv.eval.prompting import ModelInput
from refreekv.eval.runner import ConfigMismatch, RunRequest, UsageError, parse_options, prepare, run
from refreekv.eval.scoring import format_scores, merged_predictions, score_run
from refreekv.eval.tasks import TASKS
from refreekv.integration.stats import CompressionStats

FIXTURE_TASKS = ["hotpotqa", "trec", "passage_count", "lcc"]
PER_TASK = 3


@pytest.fixture(scope="module")
def assets(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("longbench")
    model = save_tiny_model(root / "model")
    data = root / "data"
    write_fixture_data(data, per_task=PER_TASK)
    return root, model, data


def request(assets, output: Path, **overrides) -> RunRequest:
    _, model, data = assets
    values = dict(model=str(model), data_dir=str(data), output_dir=str(output), max_input_length=256, tasks=",".join(FIXTURE_TASKS))
    return RunRequest(**with_settings(values, overrides))


@pytest.fixture(scope="module")
def reference_runs(assets):
    """Uninterrupted single-process runs of three methods."""
    root = assets[0]
    runs = {}
    for method, options in [("fullkv", {}), ("refreekv", {}), ("snapkv", {"budget": 0.5})]:
        output = root / f"ref-{method}"
        report = run(request(assets, output, method=method, options=options))
        assert report["finished"] and report["samples_done"] == len(FIXTURE_TASKS) * PER_TASK
        runs[method] = output
    return runs


def merged(run_dir: Path) -> dict[str, list[dict]]:
    out = {}
    for task in FIXTURE_TASKS:
        records, bad, duplicates = merged_predictions(run_dir, task)
        assert not bad and duplicates == 0
        out[task] = records
    return out


def raw_lines(run_dir: Path) -> list[str]:
    return [line for path in sorted(run_dir.glob("*/predictions.rank*.jsonl")) for line in path.read_text().splitlines()]


# -- predictions --------------------------------------------------------------


def test_records_hold_prediction_answers_length_and_measured_budget(reference_runs):
    refreekv_run, fullkv_run, snapkv_run = (merged(reference_runs[m]) for m in ("refreekv", "fullkv", "snapkv"))
    for task in FIXTURE_TASKS:
        assert [r["_id"] for r in refreekv_run[task]] == [f"{task}-{i:03d}" for i in range(PER_TASK)]
        for full, snap, ours in zip(fullkv_run[task], snapkv_run[task], refreekv_run[task]):
            n = full["input_tokens"]
            assert {"_id", "pred", "answers", "all_classes", "length", "input_tokens", "budget", "kept_per_layer"} <= set(full)
            assert full["answers"] and full["length"] > 0 and isinstance(full["pred"], str)
            assert (full["all_classes"] == TREC_CLASSES) == (task == "trec")
            assert full["chat_template"] == (task not in ("trec", "lcc"))  # the few-shot and code exceptions
            assert full["new_tokens"] <= TASKS[task].max_new_tokens
            # full cache: every layer keeps the whole prompt
            assert full["kept_per_layer"] == [n] * 4 and full["budget"] == 1.0
            # SnapKV at 50%: half the prompt in every layer
            assert snap["input_tokens"] == n and snap["kept_per_layer"] == [round(0.5 * n)] * 4
            assert snap["budget"] == pytest.approx(round(0.5 * n) / n)
            # ReFreeKV: protected layers 0 and 1 keep everything; the budget is the layer mean
            assert ours["kept_per_layer"][:2] == [n, n] and all(4 < k <= n for k in ours["kept_per_layer"])
            assert ours["budget"] == pytest.approx(sum(ours["kept_per_layer"]) / (4 * n))
    # long fixture samples were middle-truncated to 256 tokens before the chat template
    assert any(r["truncated"] for r in fullkv_run["trec"]) and max(r["input_tokens"] for r in fullkv_run["trec"]) <= 256


def test_sample_record_carries_a_planted_depth_only_when_the_data_has_one():
    class Decoder:
        def decode(self, ids, skip_special_tokens):
            return " ".join(map(str, ids))

    stats = CompressionStats(
        layers=(0, 1), kept=torch.tensor([[6.0, 6.0], [3.0, 4.5]]), held=torch.tensor([[6.0, 6.0], [3.0, 5.0]]),
        rounding=torch.zeros(2, 2, dtype=torch.float64), prompt_tokens=torch.tensor([6, 8]),
        kv_bytes_before=0, kv_bytes_after=0, kv_bytes_allocated=0, kv_padding_bytes=0,
    )  # fmt: skip
    built = ModelInput(torch.zeros(1, 8, dtype=torch.long), "text", truncated=False, chat=True)
    raw = {"_id": "n1", "input": "q", "context": "c", "answers": ["a"], "depth": 0.25}
    sample = Sample(4, "n1", "q", "c", ["a"], None, 12, raw)
    record = sample_record(sample, built, [7, 9], Decoder(), stats, row=1)
    assert record["depth"] == 0.25 and record["pred"] == "7 9" and record["new_tokens"] == 2
    # Per-head cuts make fractional kept counts; memory holds the largest head's rows.
    assert record["input_tokens"] == 8 and record["kept_per_layer"] == [6, 4.5] and record["budget"] == pytest.approx((6 / 8 + 4.5 / 8) / 2)
    assert record["held_budget"] == pytest.approx((6 / 8 + 5 / 8) / 2)
    without = Sample(4, "n1", "q", "c", ["a"], None, 12, {k: v for k, v in raw.items() if k != "depth"})
    assert "depth" not in sample_record(without, built, [7, 9], Decoder(), stats, row=1)


def test_interrupted_run_resumes_to_the_uninterrupted_output(assets, reference_runs):
    output = assets[0] / "resumed"
    # 1. a first session limited to one sample per task
    report = run(request(assets, output, limit=1))
    assert report["finished"] and report["samples_done"] == len(FIXTURE_TASKS)
    # 2. a session that crashes after three more samples ...
    seen = []

    def crash(task, record):
        seen.append(record["_id"])
        if len(seen) == 3:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        run(request(assets, output), after_sample=crash)
    stored = json.loads((output / "report.json").read_text())
    assert not stored["finished"] and stored["samples_done"] == len(FIXTURE_TASKS) + 3
    # ... while writing the next record: its JSON is there, its newline is not
    crashed_file = output / "trec" / "predictions.rank0.jsonl"
    assert "trec-002" not in crashed_file.read_text()
    with open(crashed_file, "a") as handle:
        handle.write('{"_id": "trec-002", "pred": "not from this model", "answers": []}')
    # 3. the resumed session does exactly the rest
    report = run(request(assets, output))
    assert report["finished"] and report["samples_done_now"] == len(FIXTURE_TASKS) * PER_TASK - len(FIXTURE_TASKS) - 3
    assert merged(output) == merged(reference_runs["refreekv"])
    lines = raw_lines(output)
    assert len(lines) == len(FIXTURE_TASKS) * PER_TASK and len({json.loads(line)["_id"] for line in lines}) == len(lines)
    # 4. once finished, running again does nothing and changes nothing
    before = {p: p.read_bytes() for p in output.glob("*/predictions.rank*.jsonl")}
    report = run(request(assets, output))
    assert report["samples_done_now"] == 0 and report["samples_done"] == len(FIXTURE_TASKS) * PER_TASK
    assert {p: p.read_bytes() for p in output.glob("*/predictions.rank*.jsonl")} == before


def test_sharded_run_with_two_processes_equals_one_process(assets, reference_runs):
    output = assets[0] / "sharded"
    _, model, data = assets
    # The installed refreekv (or the build on PYTHONPATH) is what runs: the
    # working directory is not the source tree, so that cannot shadow it.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "refreekv.eval.longbench", "run", "--model", str(model), "--data-dir", str(data),
        "--output-dir", str(output), "--max-input-length", "256", "--tasks", ",".join(FIXTURE_TASKS),
        "--threads", "1", "--no-progress",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, cwd=assets[0], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(rank 0 of 2)" in result.stdout and "(rank 1 of 2)" in result.stdout
    for rank in (0, 1):
        report = json.loads((output / f"report.rank{rank}.json").read_text())
        assert report["finished"] and report["world_size"] == 2
        for task in FIXTURE_TASKS:
            indices = [json.loads(line)["index"] for line in (output / task / f"predictions.rank{rank}.jsonl").read_text().splitlines()]
            assert indices and all(i % 2 == rank for i in indices)
    assert merged(output) == merged(reference_runs["refreekv"])
    assert score_run(output)["tasks"] == score_run(reference_runs["refreekv"])["tasks"]


def test_cli_run_with_options_and_device_map_auto(assets, reference_runs, capsys):
    output = assets[0] / "cli-snapkv"
    _, model, data = assets
    code = main([
        "run", "--model", str(model), "--data-dir", str(data), "--output-dir", str(output), "--method", "snapkv",
        "--option", "budget=0.5", "--option", "protected_layers=", "--tasks", "lcc", "--limit", "2",
        "--max-input-length", "256", "--device-map", "auto", "--threads", "1", "--no-progress",
    ])  # fmt: skip
    assert code == 0
    assert "snapkv: 2 samples done, 2 in this session, 0 malformed line(s) skipped" in capsys.readouterr().out
    # options spelled out at their defaults make the same configuration
    assert json.loads((output / "config.json").read_text())["config"] == json.loads(
        (reference_runs["snapkv"] / "config.json").read_text()
    )["config"]
    assert merged_predictions(output, "lcc")[0] == merged_predictions(reference_runs["snapkv"], "lcc")[0][:2]


# -- scoring and comparison ---------------------------------------------------


def test_score_recomputes_every_sample(reference_runs, capsys):
    result = score_run(reference_runs["fullkv"])
    assert json.loads((reference_runs["fullkv"] / "scores.json").read_text()) == json.loads(json.dumps(result))
    for task in FIXTURE_TASKS:
        records, _, _ = merged_predictions(reference_runs["fullkv"], task)
        expected = [
            sample_score(TASKS[task].metric, r["pred"], r["answers"], r["all_classes"], TASKS[task].first_line_only)
            for r in records
        ]
        entry = result["tasks"][task]
        assert entry["score"] == round(100 * sum(expected) / len(expected), 2)
        assert entry["samples"] == entry["expected"] == PER_TASK and entry["complete"]
        assert entry["kept_budget"] == 1.0
    assert result["average"]["score"] == round(sum(result["tasks"][t]["score"] for t in FIXTURE_TASKS) / 4, 2)
    assert main(["score", str(reference_runs["fullkv"])]) == 0
    assert "average" in capsys.readouterr().out


def write_records(path: Path, records, tail: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def hand_made_run(folder: Path, longbench_e: bool) -> Path:
    config = dict(model="m", method="snapkv", options={"budget": 0.5}, max_input_length=100, dtype="float32",
                  longbench_e=longbench_e, chat_template=True, attn_implementation="sdpa")  # fmt: skip
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"config": config}))

    def rec(i, pred, answers, length, budget, classes=None):
        return {"_id": f"s{i}", "index": i, "pred": pred, "answers": answers, "all_classes": classes,
                "length": length, "input_tokens": 10, "budget": budget, "kept_per_layer": [5]}  # fmt: skip

    trec = [
        rec(0, "Location\nHuman being", ["Location"], 1000, 0.5, TREC_CLASSES),  # first line only: 1
        rec(1, "Human being", ["Location"], 5000, 0.5, TREC_CLASSES),  # 0
    ]
    write_records(folder / "trec" / "predictions.rank0.jsonl", trec[:1])
    write_records(folder / "trec" / "predictions.rank1.jsonl", trec[1:] + trec[:1], tail='{"_id": "s9", "pr')  # dup + cut
    count = [rec(0, "3", ["3"], 9000, 0.25), rec(1, "2 or 3", ["3"], 9500, 0.75)]  # 1 and 0.5
    write_records(folder / "passage_count" / "predictions.rank0.jsonl", count)
    return folder


def test_score_merges_ranks_and_reports_bad_lines(tmp_path):
    result = score_run(hand_made_run(tmp_path / "run", longbench_e=False))
    trec, count = result["tasks"]["trec"], result["tasks"]["passage_count"]
    assert trec["score"] == 50.0 and trec["samples"] == 2 and trec["duplicates_dropped"] == 1 and trec["skipped_lines"] == 1
    assert count["score"] == 75.0 and count["kept_budget"] == 0.5
    assert result["average"] == {"score": 62.5, "kept_budget": 0.5, "tasks": 2, "samples": 4}
    assert result["skipped_lines"][0]["line"] == 3 and result["skipped_lines"][0]["file"].endswith("predictions.rank1.jsonl")
    assert not trec["complete"]  # no report.json says how many samples there are
    assert "* incomplete" in format_scores(result)


def test_score_longbench_e_length_bands(tmp_path):
    result = score_run(hand_made_run(tmp_path / "run", longbench_e=True))
    assert result["tasks"]["trec"]["bands"] == {"0-4k": 100.0, "4-8k": 0.0, "8k+": None}
    assert result["tasks"]["passage_count"]["bands"] == {"0-4k": None, "4-8k": None, "8k+": 75.0}
    assert result["average"]["bands"] == {"0-4k": 100.0, "4-8k": 0.0, "8k+": 75.0}
    assert "8k+" in format_scores(result)


def test_score_skips_prediction_records_that_cannot_be_scored(tmp_path):
    run_dir = hand_made_run(tmp_path / "run", longbench_e=False)
    path = run_dir / "trec" / "predictions.rank0.jsonl"
    with open(path, "a") as handle:  # lines 2 and 3; scored, they would change the score
        handle.write(json.dumps({"_id": "s5", "index": 5, "pred": "Location", "answers": "Location", "all_classes": TREC_CLASSES}) + "\n")
        handle.write(json.dumps({"_id": "s6", "index": 6, "pred": "Location", "answers": ["Location"], "all_classes": None}) + "\n")
    result = score_run(run_dir)
    assert result["tasks"]["trec"]["score"] == 50.0 and result["tasks"]["trec"]["samples"] == 2
    skipped = [line for line in result["skipped_lines"] if line["file"] == str(path)]
    assert [line["line"] for line in skipped] == [2, 3]
    assert skipped[0]["error"] == 'not a prediction record: answers must be a list of strings, got a string "Location"'
    assert skipped[1]["error"].startswith("not a prediction record: all_classes is required for classification tasks")


def test_compare_table_csv_and_plot(assets, reference_runs, capsys):
    output = assets[0] / "table"
    dirs = [str(reference_runs[m]) for m in ("fullkv", "refreekv", "snapkv")]
    assert main(["compare", *dirs, "--output-dir", str(output)]) == 0
    printed = capsys.readouterr().out
    markdown = (output / "comparison.md").read_text()
    header = [c.strip() for c in markdown.splitlines()[0].strip("|").split("|")]
    assert header == ["task", "fullkv", "refreekv", "snapkv"]
    body = {line.strip("|").split("|")[0].strip(): [c.strip() for c in line.strip("|").split("|")[1:]] for line in markdown.splitlines()[2:] if line.startswith("|")}
    assert list(body) == FIXTURE_TASKS + ["average"]
    for column, method in enumerate(("fullkv", "refreekv", "snapkv")):
        scores = json.loads((reference_runs[method] / "scores.json").read_text())
        for task in FIXTURE_TASKS:
            entry = scores["tasks"][task]
            assert body[task][column] == f"{entry['score']:.2f} ({100 * entry['kept_budget']:.1f}%)"
        assert body["average"][column].startswith(f"{scores['average']['score']:.2f} (")
    assert body["hotpotqa"][0].endswith("(100.0%)")
    rows = (output / "comparison.csv").read_text().splitlines()
    assert rows[0] == "task,fullkv score,fullkv kept_budget,refreekv score,refreekv kept_budget,snapkv score,snapkv kept_budget"
    assert len(rows) == len(FIXTURE_TASKS) + 2
    png = (output / "comparison.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert markdown.splitlines()[0] in printed


# -- bad input ----------------------------------------------------------------


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded although the request is invalid")

    monkeypatch.setattr(runner, "load_model", refuse)


def test_bad_requests_fail_before_any_work(assets, tmp_path, no_model_loading, capsys):
    with pytest.raises(UsageError, match="data directory .*missing not found"):
        run(request(assets, tmp_path / "a", data_dir=str(tmp_path / "missing")))
    with pytest.raises(UsageError, match="data directory .*lcc.jsonl is a file; expected a folder holding <task>.jsonl files"):
        run(request(assets, tmp_path / "a", data_dir=str(assets[2] / "lcc.jsonl")))
    with pytest.raises(UsageError, match="unknown task.*'hotpot'"):
        run(request(assets, tmp_path / "a", tasks="hotpot"))
    with pytest.raises(UsageError, match="task file.*narrativeqa.jsonl"):
        run(request(assets, tmp_path / "a", tasks="narrativeqa"))
    with pytest.raises(UsageError, match="no option 'bugdet'"):
        run(request(assets, tmp_path / "a", method="snapkv", options={"bugdet": 0.5}))
    with pytest.raises(UsageError, match="budget"):
        run(request(assets, tmp_path / "a", method="snapkv", options={"budget": 1.5}))
    with pytest.raises(UsageError, match="model directory"):
        run(request(assets, tmp_path / "a", model=str(tmp_path / "nomodel")))
    assert not (tmp_path / "a").exists()
    # the CLI says so in one line and exits 2
    assert main(["run", "--model", "x", "--data-dir", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "b"),
                 "--max-input-length", "100"]) == 2  # fmt: skip
    assert "refreekv-longbench run: error: data directory" in capsys.readouterr().err
    assert main(["run", "--model", "x", "--data-dir", ".", "--output-dir", "o", "--max-input-length", "9",
                 "--method", "snapkv", "--option", "budget"]) == 2  # fmt: skip
    assert "key=value" in capsys.readouterr().err


def test_output_dir_of_another_configuration_is_refused(assets, reference_runs, no_model_loading):
    config_before = (reference_runs["refreekv"] / "config.json").read_text()
    with pytest.raises(ConfigMismatch, match=r"method: \"refreekv\" there, \"snapkv\" now"):
        run(request(assets, reference_runs["refreekv"], method="snapkv"))
    with pytest.raises(ConfigMismatch, match="options.threshold: 0.01 there, 0.05 now"):
        run(request(assets, reference_runs["refreekv"], options={"threshold": 0.05}))
    with pytest.raises(ConfigMismatch, match="max_input_length"):
        run(request(assets, reference_runs["refreekv"], max_input_length=300))
    assert (reference_runs["refreekv"] / "config.json").read_text() == config_before
    # the same configuration with another task list or limit is fine: nothing left to do
    assert run(request(assets, reference_runs["refreekv"], tasks="lcc", limit=1))["samples_done_now"] == 0


def cli_run(assets, output: Path, *extra: str) -> list[str]:
    """A one-sample `run` command line on the fixtures, plus `extra`."""
    _, model, data = assets
    return ["run", "--model", str(model), "--data-dir", str(data), "--output-dir", str(output), "--max-input-length", "256",
            "--tasks", "lcc", "--limit", "1", "--threads", "1", "--no-progress", *extra]  # fmt: skip


def refused_in_one_line(capsys, *parts: str) -> None:
    """The CLI said why in one line on stderr, argparse-style, no traceback
    (a model that loaded may have shown its loading bar before)."""
    err = capsys.readouterr().err
    last = err.splitlines()[-1]
    assert last.startswith("refreekv-longbench run: error: ") and err.endswith("\n") and "Traceback" not in err, err
    for part in parts:
        assert part in last, err


def test_protected_layers_past_the_model_are_refused_before_loading_and_the_corrected_run_starts(assets, tmp_path, capsys, monkeypatch):
    output = tmp_path / "out"
    with monkeypatch.context() as patched:
        patched.setattr(runner, "load_model", lambda *a, **k: pytest.fail("the model was loaded although the request is invalid"))
        assert main(cli_run(assets, output, "--option", "protected_layers=0,9")) == 2
    refused_in_one_line(capsys, "protected_layers [9] out of range for a model with 4 layers: expected indices from -4 to 3, got (0, 9)")
    assert not output.exists()
    assert main(cli_run(assets, output, "--option", "protected_layers=0,3")) == 0
    assert json.loads((output / "config.json").read_text())["config"]["options"]["protected_layers"] == [0, 3]


def test_layer_options_only_the_loaded_model_can_check_leave_nothing_behind(assets, tmp_path, capsys, monkeypatch):
    # As for the bundled model, whose layer count is inside its weights file.
    monkeypatch.setattr(runner, "layer_count", lambda model: None)
    assert main(cli_run(assets, tmp_path / "out", "--option", "protected_layers=0,9")) == 2
    refused_in_one_line(capsys, f"cannot patch {assets[1]} with refreekv(protected_layers=(0,9)): protected_layers [9] out of range")
    assert not (tmp_path / "out").exists()


def test_device_cuda_on_a_cpu_only_torch_is_refused_before_loading(assets, tmp_path, capsys, no_model_loading, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(cli_run(assets, tmp_path / "out", "--device", "cuda")) == 2
    refused_in_one_line(capsys, "--device cuda: no cuda device is available to this torch")
    assert not (tmp_path / "out").exists()


def test_an_output_folder_below_a_file_is_refused_before_loading(assets, tmp_path, capsys, no_model_loading):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    assert main(cli_run(assets, blocker / "out")) == 2
    refused_in_one_line(capsys, f"--output-dir {blocker / 'out'} cannot be created: {blocker} is a file")
    assert blocker.read_text() == "mine" and list(tmp_path.iterdir()) == [blocker]


def test_an_unwritable_output_folder_is_refused_before_loading(assets, tmp_path, capsys, no_model_loading, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    # Root may write in any folder (CI runs as root), so the answer an
    # ordinary user gets for this folder is given here for every user.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == locked else real_access(path, mode))
    try:
        assert main(cli_run(assets, locked / "out")) == 2
        refused_in_one_line(capsys, f"--output-dir {locked / 'out'}: no permission to write in {locked}")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"chat_template": "no"}, "chat_template must be True or False, got 'no' of type str"),
        ({"longbench_e": 1}, "longbench_e must be True or False, got 1 of type int"),
        ({"progress": None}, "progress must be True or False, got None of type NoneType"),
        ({"threads": 0}, "--threads must be an integer >= 1, got 0"),
        ({"threads": 2.0}, "--threads must be an integer >= 1, got 2.0 of type float"),
        ({"max_input_length": 256.0}, "--max-input-length must be an integer >= 2, got 256.0 of type float"),
        ({"limit": 0}, "--limit must be an integer >= 1, got 0"),
        ({"attn_implementation": "flash_attention_2"}, "--attn-implementation must be 'sdpa' or 'eager', got 'flash_attention_2'"),
        ({"device": "gpu7"}, "--device 'gpu7' is not a device (cpu, cuda, cuda:N, auto)"),
        ({"options": {"include_sinks_in_norm": "no"}}, "include_sinks_in_norm must be True or False, got 'no' of type str"),
        ({"options": {"window_rows": 0}}, "window_rows as a row count must be >= 1, got 0"),
        ({"options": {"protected_layers": 5}}, "protected_layers must be a sequence of layer indices"),
    ],
)
def test_bad_request_values_are_refused_before_any_work(assets, tmp_path, no_model_loading, overrides, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        run(request(assets, tmp_path / "out", **overrides))
    assert not (tmp_path / "out").exists()


def test_malformed_data_lines_are_reported_skipped_and_counted(assets, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(assets[2], data)
    lines = (data / "lcc.jsonl").read_text().splitlines()
    (data / "lcc.jsonl").write_text("\n".join([lines[0], '{"_id": "broken", "context": ', lines[1]]) + "\n")
    report = run(request(assets, tmp_path / "out", data_dir=str(data), tasks="lcc"))
    assert report["finished"] and report["samples_done"] == 2
    assert report["skipped_line_count"] == 1
    skipped = report["skipped_lines"][0]
    assert skipped["file"] == str(data / "lcc.jsonl") and skipped["line"] == 2 and "not valid JSON" in skipped["error"]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["skipped_lines"] == report["skipped_lines"]


def test_empty_task_file_fails_before_any_work(assets, tmp_path, no_model_loading, capsys):
    data = tmp_path / "data"
    shutil.copytree(assets[2], data)
    (data / "trec.jsonl").write_text("")
    with pytest.raises(UsageError, match=f"task file {re.escape(str(data / 'trec.jsonl'))} is empty"):
        run(request(assets, tmp_path / "out", data_dir=str(data)))
    assert not (tmp_path / "out").exists()
    assert main(["run", "--model", str(assets[1]), "--data-dir", str(data), "--output-dir", str(tmp_path / "out"),
                 "--tasks", "trec", "--max-input-length", "100"]) == 2  # fmt: skip
    assert "trec.jsonl is empty" in capsys.readouterr().err


def test_task_files_are_checked_whole_whatever_the_limit(assets, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(assets[2], data)
    trec = [json.loads(line) for line in (data / "trec.jsonl").read_text().splitlines()]
    trec[2]["all_classes"] = None
    (data / "trec.jsonl").write_text("".join(json.dumps(sample) + "\n" for sample in trec))
    with open(data / "lcc.jsonl", "a") as handle:
        handle.write('{"_id": "lcc-cut", "context": \n')
    plan = prepare(request(assets, tmp_path / "out", data_dir=str(data), tasks="trec,lcc", limit=1))
    assert [plan.report["tasks"][task]["samples"] for task in ("trec", "lcc")] == [1, 1]
    skipped = plan.report["skipped_lines"]
    assert [(line["file"], line["line"]) for line in skipped] == [(str(data / "trec.jsonl"), 3), (str(data / "lcc.jsonl"), 4)]
    assert skipped[0]["error"].startswith("all_classes is required for classification tasks") and "got null" in skipped[0]["error"]
    assert "not valid JSON" in skipped[1]["error"]


def test_option_parsing_follows_the_defaults_types():
    assert parse_options("snapkv", ["budget=0.5", "window=16", "pooling=avg"]) == {"budget": 0.5, "window": 16, "pooling": "avg"}
    assert parse_options("snapkv", ["budget=512"]) == {"budget": 512}  # an int is a token count
    assert parse_options("refreekv", ["include_sinks_in_norm=true", "protected_layers=0,1,2", "threshold=1e-3"]) == {
        "include_sinks_in_norm": True, "protected_layers": (0, 1, 2), "threshold": 0.001,
    }  # fmt: skip
    assert parse_options("refreekv", ["protected_layers=none", "window_rows=0.05"]) == {"protected_layers": (), "window_rows": 0.05}
    with pytest.raises(UsageError, match="no option 'budget'"):
        parse_options("refreekv", ["budget=0.5"])
    with pytest.raises(UsageError, match="boolean"):
        parse_options("refreekv", ["include_sinks_in_norm=maybe"])
    with pytest.raises(UsageError, match="unknown method"):
        parse_options("nope", [])


def test_typed_options_follow_the_same_rules_as_text():
    assert coerce_option("refreekv", "protected_layers", [0, 1]) == parse_options("refreekv", ["protected_layers=0,1"])["protected_layers"] == (0, 1)
    assert coerce_option("snapkv", "budget", 512) == 512 and coerce_option("refreekv", "window_rows", 1) == 1
    assert coerce_option("refreekv", "threshold", 0.05) == 0.05 and coerce_option("refreekv", "threshold", 1) == 1
    assert coerce_option("refreekv", "include_sinks_in_norm", True) is True
    assert coerce_option("snapkv", "pooling", "avg") == "avg" and coerce_option("refreekv", "protected_layers", []) == ()
    with pytest.raises(UsageError, match=r"option budget: expected a number \(e.g. 0.5 or 512\), got True \(a boolean\)"):
        coerce_option("snapkv", "budget", True)
    with pytest.raises(UsageError, match=r"option protected_layers: expected a list of integers .*got \[0, 1.5\] \(a list\)"):
        coerce_option("refreekv", "protected_layers", [0, 1.5])
    with pytest.raises(UsageError, match=r"option include_sinks_in_norm: expected a boolean .*got 'yes' \(a string\)"):
        coerce_option("refreekv", "include_sinks_in_norm", "yes")
    with pytest.raises(UsageError, match=r"option pooling: expected a string, got 2 \(an integer\)"):
        coerce_option("snapkv", "pooling", 2)
    with pytest.raises(UsageError, match="method 'snapkv' has no option 'bugdet'; its options: budget, window"):
        coerce_option("snapkv", "bugdet", 0.5)
    with pytest.raises(UsageError, match="unknown method 'nope'; available: refreekv"):
        coerce_option("nope", "budget", 0.5)
