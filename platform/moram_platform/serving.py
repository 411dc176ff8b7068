"""Serve a trained memory with MLflow: a registry version logged as a pyfunc model.

    info = log_memory_model(RegistrySpec("s3://bucket/moram", "trace-run", 3),
                            tracking_uri="http://mlflow:5000", experiment="serving")
    # mlflow models serve -m runs:/<run id>/model --env-manager local -h 127.0.0.1 -p 5001
    # curl -d '{"inputs": ["What is 2 + 2?"]}' -H 'Content-Type: application/json' 127.0.0.1:5001/invocations

The logged model carries the version's atoms (the ``save_pretrained`` layout, a few MB) as an
artifact, and the base model's local path and revision in its model config: base weights are
never copied into MLflow. ``load_context`` loads the base model (checked against the recorded
revision) plus the atoms; ``predict`` answers a list of prompts or a DataFrame with a ``prompt``
column, greedily, ``params={"max_new_tokens": n}`` overriding the logged default.
"""
from __future__ import annotations

import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow

from moram.pretrained import load_memory, write_memory

from .generation import RegistrySpec, base_model_path, generate, load_memory_model, memory_source
from .tracking import redact

MEMORY_ARTIFACT = "memory"


class MemoryModel(mlflow.pyfunc.PythonModel):
    """Base model + MoRAM atoms, answering prompts (see the module docstring)."""

    def load_context(self, context) -> None:
        settings = context.model_config
        self.settings = settings
        self.model, self.tokenizer, _ = load_memory_model(
            Path(context.artifacts[MEMORY_ARTIFACT]), base_model=settings["base_model"],
            delta=settings.get("delta"), prune_mass=settings.get("prune_mass"), dtype=settings.get("dtype", "float32"))

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        params = params or {}
        return generate(self.model, self.tokenizer, _prompts(model_input),
                        max_new_tokens=int(params.get("max_new_tokens", self.settings["max_new_tokens"])),
                        batch_size=int(self.settings.get("batch_size", 8)),
                        chat_template=bool(self.settings.get("chat_template", True)))


def _prompts(model_input: Any) -> list[str]:
    """Prompts from what the scoring server hands over: a DataFrame (``prompt`` column, else
    its first), a list of strings, a dict with ``prompt``, or one string."""
    if hasattr(model_input, "columns"):
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        values = model_input[column].tolist()
    elif isinstance(model_input, dict):
        values = model_input.get("prompt")
        values = [values] if isinstance(values, str) else values
    elif isinstance(model_input, str):
        values = [model_input]
    else:
        values = list(model_input)
    if not values or not all(isinstance(value, str) and value for value in values):
        raise ValueError("expected one or more non-empty prompt strings")
    return values


def log_memory_model(source: RegistrySpec | str, *, tracking_uri: str | None = None,
                     experiment: str = "moram-serving", run_id: str | None = None, name: str = "model",
                     base_model: str | None = None, delta: float | None = None, prune_mass: float | None = None,
                     max_new_tokens: int = 64, batch_size: int = 8, chat_template: bool = True,
                     dtype: str = "float32") -> mlflow.models.model.ModelInfo:
    """Log a memory (a RegistrySpec, ``uri#run@version`` text or a saved folder) as an MLflow
    pyfunc model in ``run_id`` (or a new run of ``experiment``); returns its ModelInfo
    (``info.model_uri``; ``runs:/<run id>/<name>`` serves it as well)."""
    memory = load_memory(memory_source(source))
    path = base_model_path(memory, base_model)      # another base model than the memory's: refused here
    settings = {"base_model": str(path), "base_model_revision": memory.base_model_revision,
                "memory": redact(str(source)), "tasks": list(memory.tasks), "delta": delta,
                "prune_mass": prune_mass, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                "chat_template": chat_template, "dtype": dtype}
    previous = mlflow.get_tracking_uri()
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    try:
        with tempfile.TemporaryDirectory() as folder:
            atoms = write_memory(memory, Path(folder) / MEMORY_ARTIFACT)
            with _run(experiment, run_id):
                mlflow.set_tags({"moram.memory": settings["memory"], "moram.model": memory.base_model_id or ""})
                return mlflow.pyfunc.log_model(
                    name=name, python_model=MemoryModel(), artifacts={MEMORY_ARTIFACT: str(atoms)},
                    model_config=settings, signature=_signature(max_new_tokens),
                    pip_requirements=[_requirement()])
    finally:
        mlflow.set_tracking_uri(previous)


def _signature(max_new_tokens: int):
    """Prompts in, answers out; ``max_new_tokens`` a request parameter (the scoring server drops
    parameters a signature does not declare)."""
    from mlflow.models import infer_signature

    return infer_signature(["prompt"], ["answer"], params={"max_new_tokens": max_new_tokens})


def _run(experiment: str, run_id: str | None):
    if run_id:
        return mlflow.start_run(run_id=run_id)
    mlflow.set_experiment(experiment)
    return mlflow.start_run(run_name="serve-memory")


def _requirement() -> str:
    # Requirements are given, not inferred: inference would load the model at log time.
    try:
        return f"moram-platform=={metadata.version('moram-platform')}"
    except metadata.PackageNotFoundError:
        return "moram-platform"
