"""LongBench v1 for refreekv: predictions with a patched model, scores, and
comparison tables.

    refreekv-longbench run --model PATH --method refreekv --data-dir DATA \\
        --max-input-length 7500 --output-dir runs/refreekv
    refreekv-longbench score runs/refreekv
    refreekv-longbench compare runs/fullkv runs/refreekv runs/snapkv --output-dir runs/table
    refreekv-longbench sweep --model bundled:smollm2 --suite ruler --lengths 1024,2048 \
        --grid sweeps/default.toml --output-dir runs/sweep

(or `python -m refreekv.eval.longbench ...`). Data-parallel: the same `run`
command under `torchrun --nproc_per_node N` (or `accelerate launch`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from refreekv.eval.options import comma_separated
from refreekv.eval.tasks import ALL_TASKS, ENGLISH_TASKS, LONGBENCH_E_TASKS

__all__ = ["build_parser", "main"]


def _add_model_arguments(parser: argparse.ArgumentParser, threads_help: str) -> None:
    """How the model runs: the same options for `run` and `sweep`."""
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                        help="weights dtype (auto: bfloat16 on GPU, float32 on CPU)")  # fmt: skip
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (auto: cuda if available)")
    parser.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--no-chat-template", action="store_true", help="never apply the tokenizer's chat template")
    parser.add_argument("--threads", type=int, default=None, help=threads_help)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _model_settings(args: argparse.Namespace):
    """The settings `_add_model_arguments` fills."""
    from refreekv.eval.models import ModelSettings

    return ModelSettings(
        dtype=args.dtype,
        device=args.device,
        attn_implementation=args.attn_implementation,
        chat_template=not args.no_chat_template,
        threads=args.threads,
        progress=not args.no_progress,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refreekv-longbench",
        description="LongBench v1 evaluation of KV-cache compression methods (refreekv.patch).",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run",
        help="generate predictions (resumable; data-parallel under torchrun)",
        description="Generate predictions for LongBench tasks with a model patched by refreekv.patch. "
        "Re-running the same command resumes; under torchrun each rank takes a disjoint shard.",
    )
    run.add_argument("--model", required=True, help="a local transformers model folder, or 'bundled:smollm2'")
    run.add_argument("--method", default="refreekv", help="compression method (see refreekv.methods(); default refreekv)")
    run.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE",
        help="a method option, repeatable, typed like its default (e.g. budget=0.5, threshold=0.01, protected_layers=0,1)",
    )  # fmt: skip
    run.add_argument(
        "--tasks", default="default",
        help=f"comma-separated tasks, 'default' (the {len(ENGLISH_TASKS)} English tasks) or 'all' "
        f"({len(ALL_TASKS)} tasks; with --longbench-e the {len(LONGBENCH_E_TASKS)} LongBench-E tasks)",
    )  # fmt: skip
    run.add_argument("--longbench-e", action="store_true", help="read <task>_e.jsonl (LongBench-E) and score per length band")
    run.add_argument("--data-dir", required=True, help="folder with the benchmark's <task>.jsonl files")
    run.add_argument("--max-input-length", type=int, required=True, help="prompt tokens kept (middle truncation beyond)")
    run.add_argument("--output-dir", required=True, help="run directory (created; an existing one is resumed)")
    run.add_argument("--limit", type=int, default=None, help="first N samples of each task")
    run.add_argument("--device-map", default=None, choices=["auto"], help="spread one model over all GPUs")
    _add_model_arguments(run, threads_help="torch CPU threads (default: torch's; split between local ranks)")

    sweep = commands.add_parser(
        "sweep",
        help="methods x settings x tasks x lengths on a generated suite (resumable; one prefill per sample)",
        description="Run every point of a grid (methods and settings, see sweeps/default.toml) on every task and "
        "context length, record score and measured kept budget, and write the quality map (tables, frontier, "
        "needle heatmap, per-layer budgets). Re-running the same command resumes.",
    )
    sweep.add_argument("--model", required=True, help="a local transformers model folder, or 'bundled:smollm2'")
    sweep.add_argument("--grid", required=True, help="TOML file: one table of options per method, lists are swept; a "
                       "table's prefill key picks the prefill modes (one-forward, question-after, streaming-<tokens>)")
    sweep.add_argument("--lengths", required=True, type=comma_separated(int), help="context lengths in model tokens, e.g. 1024,2048")
    sweep.add_argument("--suite", default=None, choices=["ruler"], help="generate this suite into OUTPUT_DIR/data")
    sweep.add_argument("--data-dir", default=None, help="instead of --suite: a folder of <length>/<task>.jsonl")
    sweep.add_argument("--tasks", default=None, help="comma-separated tasks (default: every task of the suite)")
    sweep.add_argument("--samples", type=int, default=10, help="samples per task and length (default 10)")
    sweep.add_argument("--seed", type=int, default=0, help="seed of the generated suite (default 0)")
    sweep.add_argument("--batch-size", type=int, default=8,
                       help="samples prefilled and decoded together, left-padded (default 8)")  # fmt: skip
    sweep.add_argument("--max-input-length", type=int, default=None, help="cut longer inputs in the middle (default: never)")
    sweep.add_argument("--output-dir", required=True, help="sweep directory (created; an existing one is resumed)")
    sweep.add_argument("--plain", action="store_true", help="one prefill per point (slow; to measure the branching)")
    _add_model_arguments(sweep, threads_help="torch CPU threads (default: torch's)")

    score = commands.add_parser("score", help="score a run directory (writes scores.json)")
    score.add_argument("run_dir")

    compare = commands.add_parser("compare", help="several runs -> markdown/CSV table and a PNG plot; sweeps -> quality map")
    compare.add_argument("run_dirs", nargs="+", help="run directories, or sweep directories (with sweep.json); not both")
    compare.add_argument("--output-dir", required=True, help="where comparison.{md,csv,png} (sweeps: quality.* and figures) go")
    compare.add_argument("--names", default=None, help="comma-separated column names (default: method and options)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from refreekv.eval.errors import UsageError

    try:
        if args.command == "run":
            from refreekv.eval.options import parse_options
            from refreekv.eval.runner import RunRequest, run

            request = RunRequest(
                model=args.model,
                data_dir=args.data_dir,
                output_dir=args.output_dir,
                max_input_length=args.max_input_length,
                method=args.method,
                options=parse_options(args.method, args.option),
                tasks=args.tasks,
                longbench_e=args.longbench_e,
                limit=args.limit,
                device_map=args.device_map,
                settings=_model_settings(args),
            )
            report = run(request)
            rank = f" (rank {report['rank']} of {report['world_size']})" if report["world_size"] > 1 else ""
            print(
                f"{report['label']}{rank}: {report['samples_done']} samples done, "
                f"{report['samples_done_now']} in this session, {report['skipped_line_count']} malformed line(s) skipped"
            )
        elif args.command == "sweep":
            from refreekv.eval.sweep import SweepRequest, run_sweep

            report = run_sweep(
                SweepRequest(
                    model=args.model,
                    output_dir=args.output_dir,
                    grid=args.grid,
                    lengths=args.lengths,
                    suite=args.suite,
                    data_dir=args.data_dir,
                    tasks=None if args.tasks is None else [t.strip() for t in args.tasks.split(",") if t.strip()],
                    samples=args.samples,
                    seed=args.seed,
                    batch_size=args.batch_size,
                    max_input_length=args.max_input_length,
                    plain=args.plain,
                    settings=_model_settings(args),
                )
            )
            print((Path(args.output_dir) / "quality.md").read_text(encoding="utf-8"))
            print(
                f"{report['done_now']} sample-points in this session ({report['done_before']} before), "
                f"{report['sample_points_per_second']} per second; written to {args.output_dir}"
            )
        elif args.command == "score":
            from refreekv.eval.scoring import format_scores, score_run

            result = score_run(args.run_dir)
            print(format_scores(result))
            print(f"\nwritten to {args.run_dir}/scores.json")
        else:
            from refreekv.eval.compare import compare_runs

            names = [n.strip() for n in args.names.split(",")] if args.names else None
            result = compare_runs(args.run_dirs, args.output_dir, names)
            print(result["markdown"])
            print("written: " + ", ".join(str(p) for p in result["files"]))
    except (UsageError, FileNotFoundError) as error:
        print(f"refreekv-longbench {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
