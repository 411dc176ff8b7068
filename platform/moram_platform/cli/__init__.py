"""``moram``: use a trained memory from a shell.

    moram generate --registry s3://bucket/moram --run trace-run --version 3 "What is 2 + 2?"
    moram generate --run trace-run --input prompts.jsonl --output answers.jsonl
    moram evaluate --run trace-run --version 3 --tasks FOMC ScienceQA --profile moram-repo
    moram compare --tracking-uri http://127.0.0.1:5000 --experiment trace [--runs a b | --study NAME]
    moram config show jobs/configs/trace/smollm2-135m_moram.yaml --set train.lr=1e-3
    moram config validate my.yaml
    moram registry list                       # the moram-registry commands

Errors (unknown run or version, another base model than the run's, a memory folder without
weights, a bad prompt line, a bad config) are one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys

from moram import MoRAMConfigError, ShardError
from moram.pretrained import PretrainedError

from ..benchmark import benchmark_class
from ..config import ConfigError
from ..exits import exit_on_bad_input
from ..registry import REGISTRY_URI_ENV, RegistryError, default_registry_uri


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["registry"]:          # the moram-registry commands, arguments untouched
        from ..registry.cli import main as registry_main

        return registry_main(argv[1:])
    args = parser().parse_args(argv)
    return exit_on_bad_input(lambda: args.handler(args), prefix="moram: error", errors=USER_ERRORS)


def _user_errors() -> tuple[type[BaseException], ...]:
    from ..generation import GenerationError
    from ..runs import CompareError

    return (RegistryError, PretrainedError, ShardError, MoRAMConfigError, ConfigError, GenerationError,
            benchmark_class("trace").data_error, CompareError, FileNotFoundError, FileExistsError)


USER_ERRORS = _user_errors()


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="moram", description="Use trained MoRAM memories: generate, evaluate, "
                                  "compare runs, check configs, inspect the registry.")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _generate_parser(commands)
    _evaluate_parser(commands)
    _compare_parser(commands)
    _config_parser(commands)
    commands.add_parser("registry", help="the moram-registry commands (list, show, verify, export); "
                                         "see `moram registry --help`", add_help=False)
    return top


def _memory_arguments(sub: argparse.ArgumentParser, version_required: bool) -> None:
    sub.add_argument("--registry", default=default_registry_uri(), metavar="URI",
                     help=f"registry: a path, file://... or s3://bucket/prefix (default: ${REGISTRY_URI_ENV} or "
                          "./moram_runs); S3 endpoint and credentials come from the AWS environment")
    sub.add_argument("--run", required=True, help="the run id")
    sub.add_argument("--version", type=int, required=version_required,
                     help="version number (version v holds tasks 0..v-1)" + ("" if version_required else
                                                                           "; default: the latest"))
    sub.add_argument("--base-model", metavar="PATH",
                     help="the base model (folder or .gguf), when the manifest's id is not a local model; "
                          "its fingerprint must match the run's")


# -- generate --------------------------------------------------------------------------------
def _generate_parser(commands) -> None:
    sub = commands.add_parser("generate", help="answer prompts with a registry version on its base model",
                              description="Greedy generation with a version's atoms on the run's base model "
                                          "(from the manifest), in the tokenizer's chat template where it has one.")
    _memory_arguments(sub, version_required=False)
    sub.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompts (or --input)")
    sub.add_argument("--input", metavar="FILE.jsonl",
                     help='JSON Lines: {"prompt": "..."} per line (other keys are copied to the output) or a string')
    sub.add_argument("--output", metavar="FILE.jsonl", help="write {..., \"output\": answer} per prompt here")
    sub.add_argument("--delta", type=float, help="δ threshold view (Eq. 8) instead of the trained one")
    sub.add_argument("--prune-mass", type=float, help="pruning view: keep each task's atoms covering this mass")
    sub.add_argument("--max-new-tokens", type=int, default=64)
    sub.add_argument("--batch-size", type=int, default=8)
    sub.add_argument("--no-chat-template", dest="chat_template", action="store_false",
                     help="feed prompts as they are (TRACE prompts are trained without a template)")
    sub.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    sub.set_defaults(handler=_generate)


def _generate(args) -> int:
    from ..generation import GenerationError, RegistrySpec, generate, load_memory_model, read_prompts, write_answers

    if bool(args.prompts) == bool(args.input):
        raise GenerationError("give prompts as arguments or --input FILE.jsonl (one of the two)")
    records = read_prompts(args.input) if args.input else [{"prompt": p} for p in args.prompts]  # before loading
    spec = RegistrySpec(args.registry, args.run, args.version)
    model, tokenizer, memory = load_memory_model(spec, base_model=args.base_model, delta=args.delta,
                                                 prune_mass=args.prune_mass, dtype=args.dtype)
    answers = generate(model, tokenizer, [r["prompt"] for r in records], max_new_tokens=args.max_new_tokens,
                       batch_size=args.batch_size, chat_template=args.chat_template)
    if args.output:
        write_answers(args.output, records, answers)
        print(f"{len(answers)} answers from {memory.where} written to {args.output}", file=sys.stderr)
    elif len(records) == 1 and not args.input:
        print(answers[0])
    else:
        for record, answer in zip(records, answers):
            print(json.dumps({**record, "output": answer}, ensure_ascii=False))
    return 0


# -- evaluate --------------------------------------------------------------------------------
def _evaluate_parser(commands) -> None:
    sub = commands.add_parser("evaluate", help="score a registry version on TRACE tasks (recorded in the registry)",
                              description="Score a version on any TRACE tasks; scores are recorded in the "
                                          "registry and reused next time (the command says so).")
    _memory_arguments(sub, version_required=True)
    sub.add_argument("--tasks", nargs="+", required=True, help="TRACE task names")
    profiles = benchmark_class("trace").eval_profiles
    sub.add_argument("--profile", choices=list(profiles), default=profiles[0],
                     help="evaluation profile (default: %(default)s; see docs/trace.md)")
    sub.add_argument("--config", metavar="FILE", help="a job config for data.root, data.max_eval_examples, "
                                                      "eval.max_new_tokens, eval.batch_size (default: the defaults)")
    sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set data.max_eval_examples=20 (repeatable)")
    sub.add_argument("--quiet", action="store_true", help="no progress bars")
    sub.set_defaults(handler=_evaluate)


def _evaluate(args) -> int:
    from ..generation import RegistrySpec
    from .evaluate import evaluate_version, format_scores

    spec = RegistrySpec(args.registry, args.run, args.version)
    scores = evaluate_version(spec, args.tasks, profile=args.profile, config_file=args.config,
                              overrides=args.overrides, base_model=args.base_model, progress=not args.quiet,
                              say=lambda text: print(text, file=sys.stderr))
    print(format_scores(spec, args.version, scores))
    return 0


# -- compare ---------------------------------------------------------------------------------
def _compare_parser(commands) -> None:
    sub = commands.add_parser("compare", help="a table of the sequences' summary metrics from MLflow")
    sub.add_argument("--tracking-uri", required=True, help="MLflow tracking URI (http://..., sqlite:///...)")
    sub.add_argument("--experiment", required=True, help="MLflow experiment (default of the jobs: the benchmark name)")
    sub.add_argument("--runs", nargs="+", metavar="RUN", help="run ids to compare, in this order (default: all)")
    sub.add_argument("--study", help="the comparison report of this study (mean ± std per method; "
                                     "moram_platform.report), as Markdown, or CSV with --format csv")
    sub.add_argument("--format", choices=("table", "csv", "json"), default="table")
    sub.set_defaults(handler=_compare)


def _compare(args) -> int:
    from ..runs import compare_runs, format_table

    if args.study:
        from ..report import study_report

        report = study_report(args.tracking_uri, args.experiment, args.study)
        print(report.csv() if args.format == "csv" else report.markdown())
        return 0
    rows = compare_runs(args.tracking_uri, args.experiment, args.runs)
    print(json.dumps(rows, indent=1) if args.format == "json" else format_table(rows, args.format))
    return 0


# -- config ----------------------------------------------------------------------------------
def _config_parser(commands) -> None:
    sub = commands.add_parser("config", help="show or validate a job config (no Ray, no data loaded)")
    actions = sub.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (("show", "print the resolved config as YAML"), ("validate", "check a config; list every error")):
        action = actions.add_parser(name, help=text)
        action.add_argument("file", help="a job config YAML file")
        action.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                            help="override a key, e.g. --set train.lr=1e-3 (repeatable)")
        action.set_defaults(handler=_config_show if name == "show" else _config_validate)


def _config_show(args) -> int:
    import yaml

    from ..config import load_config

    print(yaml.safe_dump(load_config(args.file, args.overrides).to_dict(), sort_keys=False), end="")
    return 0


def _config_validate(args) -> int:
    from ..config import load_config

    load_config(args.file, args.overrides)
    print(f"{args.file}: valid")
    return 0
