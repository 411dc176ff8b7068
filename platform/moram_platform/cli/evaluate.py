"""Score a registry version on TRACE tasks, recorded in the registry beside the sequence's own
evaluations, so nothing is evaluated twice.

Records: the sequence driver writes one record per (version, profile) holding every task of
its order (``registry.evaluations``); a task evaluated here gets its own record, named
``<profile>@<task>-n<examples>-t<max_new_tokens>``, because a record is create-only and the
sequence's must keep its whole row. A score is reused from the sequence's record when it was
computed on the same number of examples, else from this command's record for the same settings.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..config import load_config
from ..generation import RegistrySpec, base_model_path, load_memory_model
from ..registry import Registry
from ..registry.evaluations import read_evaluation, record_evaluation


@dataclass
class TaskScore:
    task: str
    result: dict[str, Any]      # {"task", "metric", "score", "n", "profile"}
    reused_from: str | None     # the record it came from, None if evaluated now


def task_record_name(profile: str, task: str, examples: int, max_new_tokens: int) -> str:
    return f"{profile}@{task}-n{examples}-t{max_new_tokens}"


def evaluate_version(spec: RegistrySpec, tasks: Sequence[str], *, profile: str = "moram-repo",
                     config_file: str | None = None, overrides: Sequence[str] = (),
                     base_model: str | None = None, progress: bool = True,
                     say: Callable[[str], None] = print) -> list[TaskScore]:
    """Scores of ``spec``'s version on ``tasks`` under ``profile``; settings (data root, example
    caps, max_new_tokens, batch size) come from the job config ``config_file`` and ``overrides``."""
    from ..benchmark import get_benchmark

    version = spec.resolve()                         # unknown run or version: an error before any work
    registry = Registry(spec.uri)
    memory = spec.load_memory()
    model_path = base_model_path(memory, base_model)  # another base model than the run's: an error
    config = load_config(config_file, overrides=[*overrides, "benchmark=trace", f"data.tasks={json.dumps(list(tasks))}",
                                                 f"eval.profile={profile}", f"model.source={model_path}"])
    benchmark = get_benchmark("trace")
    benchmark.validate(config)                       # every task and data file, before the model loads

    sequence_record = read_evaluation(registry, spec.run, version.version, profile)
    scores, todo = [], []
    for task in config.data.tasks:
        examples = benchmark.eval_size(config, task)
        name = task_record_name(profile, task, examples, config.eval.max_new_tokens)
        previous = (sequence_record or {}).get("scores", {}).get(task)
        if previous is not None and previous.get("n") == examples:
            scores.append(TaskScore(task, previous, f"the sequence's record ({profile})"))
        elif (record := read_evaluation(registry, spec.run, version.version, name)) is not None:
            scores.append(TaskScore(task, record["scores"][task], name))
        else:
            scores.append(TaskScore(task, {}, None))
            todo.append((len(scores) - 1, name))
    for score in scores:
        if score.reused_from:
            say(f"{score.task}: reusing the score recorded in {score.reused_from}")
    if todo:
        model, tokenizer, _ = load_memory_model(memory, base_model=model_path, dtype=config.model.dtype)
        for position, name in todo:
            task = scores[position].task
            result = benchmark.evaluate(config, model, tokenizer, task, progress=progress)
            record = record_evaluation(registry, spec.run, version.version, name, {task: result})
            scores[position].result = record["scores"][task]
    return scores


def format_scores(spec: RegistrySpec, version: int, scores: Sequence[TaskScore]) -> str:
    lines = [f"run {spec.run} version {version}:"]
    width = max(len(s.task) for s in scores)
    for s in scores:
        r = s.result
        lines.append(f"  {s.task:<{width}}  {r['metric']:<16} {r['score']:7.2f}  (n={r['n']}, profile {r['profile']}"
                     f"{', recorded earlier' if s.reused_from else ''})")
    return "\n".join(lines)
