"""`refreekv-longbench sweep` on a tiny random Llama: branched points equal
plain patched runs, a killed sweep resumes to one record per point and
sample, and bad requests fail before any model is loaded."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from eval_fixtures import save_tiny_model, with_settings

from refreekv.eval import runner
from refreekv.eval.errors import ConfigMismatch, UsageError
from refreekv.eval.generation import decode_groups
from refreekv.eval.grid import parse_grid
from refreekv.eval.longbench import main
from refreekv.eval.rundir import read_records
from refreekv.eval.sweep import SweepRequest, run_sweep

LENGTHS = [512, 768]
TASKS = ["niah_single", "niah_multivalue", "variable_tracking", "common_words"]
SAMPLES = 2
GRID = """
[fullkv]

[refreekv]
threshold = [0.01]

[snapkv]
budget = 0.5

[[h2o]]
observation = "all"
budget = 0.5
"""
POINTS = 4
COMPARED = ("pred", "new_tokens", "input_tokens", "budget", "kept_per_layer", "depth", "answers")


@pytest.fixture(scope="module")
def assets(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("sweep")
    grid = root / "grid.toml"
    grid.write_text(GRID, encoding="utf-8")
    return root, save_tiny_model(root / "model"), grid


def request(assets, output: Path, **overrides) -> SweepRequest:
    _, model, grid = assets
    values = dict(model=str(model), output_dir=str(output), grid=str(grid), lengths=LENGTHS, tasks=TASKS, suite="ruler",
                  samples=SAMPLES, batch_size=3)  # fmt: skip
    return SweepRequest(**with_settings(values, overrides))


def keyed(records):
    return {(r["point"], r["length"], r["task"], r["_id"]): r for r in records}


@pytest.fixture(scope="module")
def branched(assets):
    output = assets[0] / "branched"
    report = run_sweep(request(assets, output))
    assert report["finished"] and report["done_now"] == report["sample_points"] == len(LENGTHS) * len(TASKS) * SAMPLES * POINTS
    return output


def test_branched_points_equal_plain_patched_runs(assets, branched):
    plain_dir = assets[0] / "plain"
    run_sweep(request(assets, plain_dir, plain=True))
    plain, fast = keyed(read_records(plain_dir)[0]), keyed(read_records(branched)[0])
    assert plain.keys() == fast.keys() and len(fast) == len(LENGTHS) * len(TASKS) * SAMPLES * POINTS
    for key, record in plain.items():
        assert {f: record.get(f) for f in COMPARED} == {f: fast[key].get(f) for f in COMPARED}, key
    # the comparison compares something: methods cut, and differently
    budgets = {r["point"]: r["budget"] for r in fast.values()}
    assert budgets["fullkv"] == 1.0 and budgets["snapkv(budget=0.5)"] < 0.6 and budgets["refreekv(threshold=0.01)"] < 1.0


def test_a_batch_of_one_gives_what_batches_give(assets, branched):
    single = assets[0] / "single"
    run_sweep(request(assets, single, batch_size=1, tasks=TASKS[:2], lengths=LENGTHS[:1]))
    batched = keyed(read_records(branched)[0])
    for key, record in keyed(read_records(single)[0]).items():
        assert {f: record.get(f) for f in COMPARED} == {f: batched[key].get(f) for f in COMPARED}, key


def test_tasks_that_decode_alike_share_batches():
    """The needle tasks generate with the same length and end tokens, so
    their samples are batched together (test_a_batch_of_one_gives_what_batches_give
    then proves the tokens do not change); samsum stops at a newline too."""
    from types import SimpleNamespace

    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=2))
    tokenizer = SimpleNamespace(eos_token_id=2, pad_token_id=0, encode=lambda text, add_special_tokens: [13])
    work = {(512, task): [f"{task}-{i}" for i in range(2)] for task in ("niah_single", "variable_tracking", "niah_multikey", "samsum")}
    work[768, "niah_single"] = ["long-0"]
    groups = decode_groups(work, model, tokenizer)
    summary = [(length, settings.max_new_tokens, settings.eos, [task for task, _ in items]) for length, settings, items in groups]
    assert summary == [
        (512, 48, (2,), ["niah_single", "niah_single", "niah_multikey", "niah_multikey"]),
        (512, 40, (2,), ["variable_tracking", "variable_tracking"]),
        (512, 128, (2, 13), ["samsum", "samsum"]),
        (768, 48, (2,), ["niah_single"]),
    ]
    assert groups[2][1].options == {"eos_token_id": [2, 13], "pad_token_id": 0, "min_new_tokens": 1}


def test_records_and_report(branched):
    records = read_records(branched)[0]
    sweep = json.loads((branched / "sweep.json").read_text())
    assert [p["label"] for p in sweep["points"]] == [
        "fullkv", "refreekv(threshold=0.01)", "snapkv(budget=0.5)", "h2o(budget=0.5, observation=all)",
    ]  # fmt: skip
    assert sweep["lengths"] == LENGTHS and sweep["tasks"] == TASKS and sweep["environment"]["machine"]["cores"]
    needles = [r for r in records if r["task"] == "niah_single"]
    assert {r["length"] for r in records} == set(LENGTHS)
    assert all(r["depth"] is not None for r in needles)
    assert all(len(r["kept_per_layer"]) == 4 for r in records)
    for name in ("quality.md", "quality.csv", "quality.json", "frontier.png", "report.json"):
        assert (branched / name).stat().st_size > 0, name
    summary = json.loads((branched / "quality.json").read_text())
    overall = [c for c in summary["cells"] if c["task"] == "overall" and c["point"] == "fullkv"]
    assert {c["length"] for c in overall} == set(LENGTHS) and all(c["kept_budget"] == 1.0 for c in overall)


def test_rerunning_a_finished_sweep_does_nothing(assets, branched):
    before = (branched / "records.jsonl").read_bytes()
    report = run_sweep(request(assets, branched))
    assert report["done_now"] == 0 and report["finished"]
    assert (branched / "records.jsonl").read_bytes() == before


def test_a_killed_sweep_resumes_to_one_record_per_point_and_sample(assets, branched):
    output = assets[0] / "killed"
    _, model, grid = assets
    command = [
        sys.executable, "-m", "refreekv.eval.longbench", "sweep", "--model", str(model), "--suite", "ruler",
        "--lengths", ",".join(map(str, LENGTHS)), "--tasks", ",".join(TASKS), "--samples", str(SAMPLES),
        "--grid", str(grid), "--output-dir", str(output), "--batch-size", "3", "--threads", "1", "--no-progress",
    ]  # fmt: skip
    records = output / "records.jsonl"
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.getcwd()})
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if records.exists() and records.read_text().count("\n") >= 10:
            break
        time.sleep(0.05)
    assert process.poll() is None, f"the sweep ended before it could be killed: {process.stderr.read().decode()[-2000:]}"
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = records.read_text().count("\n")
    assert 10 <= written < len(LENGTHS) * len(TASKS) * SAMPLES * POINTS
    with open(records, "a", encoding="utf-8") as handle:
        handle.write('{"point": "fullkv", "length": 512, "task": "niah_sin')  # a record cut short
    report = run_sweep(request(assets, output))
    assert report["done_before"] == written and report["done_now"] == report["sample_points"] - written
    lines = records.read_text().splitlines()
    resumed = [json.loads(line) for line in lines]
    assert len(resumed) == len(keyed(resumed)) == report["sample_points"]
    uninterrupted = keyed(read_records(branched)[0])
    for key, record in keyed(resumed).items():
        assert {f: record.get(f) for f in COMPARED} == {f: uninterrupted[key].get(f) for f in COMPARED}, key


def test_a_sweep_may_grow_but_not_change_its_configuration(assets, branched, tmp_path):
    with pytest.raises(ConfigMismatch, match=r"seed: 0 there, 1 now"):
        run_sweep(request(assets, branched, seed=1))
    # the same label with other options (e.g. a default that changed between versions)
    sweep_file = branched / "sweep.json"
    stored = json.loads(sweep_file.read_text())
    edited = json.loads(json.dumps(stored))
    edited["points"][2]["options"]["window"] = 16
    sweep_file.write_text(json.dumps(edited))
    try:
        with pytest.raises(ConfigMismatch, match=r"the point snapkv\(budget=0.5\)[\s\S]*options.window: 16 there, 8 now"):
            run_sweep(request(assets, branched))
    finally:
        sweep_file.write_text(json.dumps(stored))
    # a recorded point under a new label (an option spelled out that was the default)
    renamed = parse_grid({"fullkv": {}, "snapkv": [{"budget": 0.5, "window": 8}]})
    renamed_label = next(p.label for p in renamed if p.method == "snapkv")
    records_before = (branched / "records.jsonl").read_text()
    with pytest.raises(UsageError, match=rf"holds the point snapkv\(budget=0.5\) with the options of the point {re.escape(renamed_label)}"):
        run_sweep(request(assets, branched, grid=renamed))
    assert (branched / "records.jsonl").read_text() == records_before
    assert json.loads(sweep_file.read_text()) == stored
    grown = tmp_path / "grown"
    run_sweep(request(assets, grown, tasks=TASKS[:1], lengths=LENGTHS[:1], grid=parse_grid({"fullkv": {}})))
    report = run_sweep(request(assets, grown, tasks=TASKS[:1], lengths=LENGTHS[:1], grid=parse_grid({"fullkv": {}, "snapkv": {"budget": 0.5}})))
    assert report["done_before"] == SAMPLES and report["done_now"] == SAMPLES
    labels = [p["label"] for p in json.loads((grown / "sweep.json").read_text())["points"]]
    assert labels == ["fullkv", "snapkv(budget=0.5)"]


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the request was checked")

    monkeypatch.setattr(runner, "load_model", refuse)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"grid": "GRID:[snapkv]\nbudgets = 0.5"}, "no option 'budgets'"),
        ({"grid": "GRID:[nope]"}, "unknown method 'nope'"),
        ({"grid": "GRID:[snapkv"}, "not valid TOML"),
        ({"tasks": []}, "no task given"),
        ({"tasks": ["hotpotqa"]}, "not in the ruler suite"),
        ({"tasks": ["nope"]}, "unknown task"),
        ({"lengths": []}, "--lengths takes context lengths"),
        ({"lengths": [512, 512]}, "names a length twice"),
        ({"samples": 0}, "--samples must be an integer >= 1, got 0"),
        ({"samples": 2.5}, "--samples must be an integer >= 1, got 2.5 of type float"),
        ({"batch_size": 0}, "--batch-size must be an integer >= 1, got 0"),
        ({"lengths": [512.5]}, "--lengths takes context lengths in tokens, each >= 16"),
        ({"suite": None}, "give either --suite"),
        ({"data_dir": "/tmp"}, "give either --suite"),
        ({"attn_implementation": "flash_attention_2"}, "--attn-implementation must be 'sdpa' or 'eager', got 'flash_attention_2'"),
        ({"threads": 0}, "--threads must be an integer >= 1, got 0"),
        ({"device": "gpu7"}, "--device 'gpu7' is not a device"),
        ({"chat_template": "no"}, "chat_template must be True or False, got 'no' of type str"),
        ({"plain": 1}, "plain must be True or False, got 1 of type int"),
        ({"grid": "GRID:[refreekv]\nprotected_layers = [0, 9]"},
         r"grid point refreekv\(protected_layers=\(0,9\)\): protected_layers \[9\] out of range for a model with 4 layers"),
        ({"grid": "GRID:[refreekv]\ninclude_sinks_in_norm = \"no\""}, "option include_sinks_in_norm: expected a boolean"),
        ({"suite": "longbench"}, "unknown suite 'longbench'"),
        ({"model": "/nonexistent/model"}, "model directory /nonexistent/model not found"),
    ],
)
def test_bad_requests_fail_before_any_model_is_loaded(assets, tmp_path, no_model, overrides, message):
    grid = overrides.get("grid")
    if isinstance(grid, str) and grid.startswith("GRID:"):
        path = tmp_path / "bad.toml"
        path.write_text(grid[len("GRID:") :], encoding="utf-8")
        overrides = {**overrides, "grid": str(path)}
    with pytest.raises(UsageError, match=message):
        run_sweep(request(assets, tmp_path / "out", **overrides))
    assert not (tmp_path / "out").exists()


def test_device_cuda_on_a_cpu_only_torch_fails_before_any_model_is_loaded(assets, tmp_path, no_model, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="--device cuda: no cuda device is available to this torch"):
        run_sweep(request(assets, tmp_path / "out", device="cuda"))
    assert not (tmp_path / "out").exists()


def test_an_output_folder_below_a_file_fails_before_any_model_is_loaded(assets, tmp_path, no_model):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    with pytest.raises(UsageError, match=f"--output-dir {blocker / 'out'} cannot be created: {blocker} is a file"):
        run_sweep(request(assets, blocker / "out"))
    assert list(tmp_path.iterdir()) == [blocker]


def test_an_empty_task_file_fails_before_any_model_is_loaded(assets, tmp_path, no_model):
    data = tmp_path / "data"
    for length in LENGTHS:
        (data / str(length)).mkdir(parents=True)
        (data / str(length) / "niah_single.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(UsageError, match="niah_single.jsonl"):
        run_sweep(request(assets, tmp_path / "out", suite=None, data_dir=str(data), tasks=["niah_single"]))
    for length in LENGTHS:  # lines, but none valid: its cells would be missing
        (data / str(length) / "niah_single.jsonl").write_text('{"_id": 1}\n', encoding="utf-8")
    with pytest.raises(UsageError, match=r"niah_single.jsonl has no valid sample \(1 malformed line\(s\)\)"):
        run_sweep(request(assets, tmp_path / "out", suite=None, data_dir=str(data), tasks=["niah_single"]))
    with pytest.raises(UsageError, match="not found"):
        run_sweep(request(assets, tmp_path / "out", suite=None, data_dir=str(data), tasks=["qa_planted"]))


def test_the_cli_reports_bad_requests_in_one_line(assets, tmp_path, capsys, no_model):
    _, model, grid = assets
    code = main(["sweep", "--model", str(model), "--suite", "ruler", "--lengths", "512", "--grid", str(grid),
                 "--samples", "0", "--output-dir", str(tmp_path / "o")])  # fmt: skip
    assert code == 2 and "refreekv-longbench sweep: error: --samples must be an integer >= 1, got 0" in capsys.readouterr().err
