"""Injection, PEFT-style: ``get_moram_model(model, config)`` wraps the configured projections.

    model = get_moram_model(AutoModelForCausalLM.from_pretrained(...), MoRAMConfig(r=8, k=8))
    for task in tasks:
        model.begin_task(task.name)       # r fresh atoms per layer; only they train
        train(model, task)                # any loop: plain PyTorch, HF Trainer, DeepSpeed...
        report = model.end_task()         # prune (optional), bake the scale, freeze
        shard = model.export_shard()      # this task's atoms + statistics as safetensors bytes
"""
from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

from .attention import split_multihead_attention
from .config import MoRAMConfig, MoRAMConfigError
from .layer import MoRAMLayer, is_projection
from .methods import METHODS, method_for
from .persistence import Shard, ShardError, read_shard, shard_to_bytes

_SPLIT_PROJECTIONS = {"q_proj", "k_proj", "v_proj", "out_proj"}


@dataclass
class TaskReport:
    """What end_task() did: atoms trained, kept and dropped, per layer."""

    task: str
    task_index: int
    added: dict[str, int] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)

    @property
    def atoms_added(self) -> int:
        return sum(self.added.values())

    @property
    def atoms_kept(self) -> int:
        return sum(self.kept.values())

    @property
    def atoms_dropped(self) -> int:
        return self.atoms_added - self.atoms_kept

    def dropped(self) -> dict[str, int]:
        return {name: self.added[name] - self.kept[name] for name in self.added}


class MoRAMModel(nn.Module):
    """A model whose target projections carry MoRAM atom banks; everything else is frozen.

    ``moram_config`` is the method's config; ``config`` (like every other unknown attribute)
    reaches the wrapped model, so Hugging Face generate and pipelines see their own config.
    """

    def __init__(self, model: nn.Module, config: MoRAMConfig):
        super().__init__()
        self.model = model
        self.moram_config = config
        self.method = method_for(config.method)
        self.task_names: list[str] = []
        self._open_task: str | None = None
        self._untrained_block = False        # open_untrained_block(): an evaluation-only block
        if _wants_split_attention(model, config):
            split_multihead_attention(model)
        for parameter in model.parameters():  # after the split: its new projections are base too
            parameter.requires_grad_(False)
        self.moram_layers: dict[str, MoRAMLayer] = {}
        for name in _matching_modules(model, config.target_modules):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            layer = MoRAMLayer(getattr(parent, child), config, name=name)
            setattr(parent, child, layer)
            self.moram_layers[name] = layer

    # -- delegation to the wrapped model (generate, config, ...) ---------------------------
    def forward(self, *args, token_mask: torch.Tensor | None = None, **kwargs):
        """The wrapped model's forward; activation statistics skip the positions where
        ``token_mask`` [batch, seq] is 0, by default the 2-D ``attention_mask``'s padding (a packed
        batch has no attention mask: its filler is named by ``token_mask``)."""
        mask = kwargs.get("attention_mask") if token_mask is None else token_mask
        with self.token_mask(mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None):
            return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    @contextlib.contextmanager
    def token_mask(self, mask: torch.Tensor | None) -> Iterator[None]:
        """Inside the block, positions where ``mask`` [batch, seq] is 0 (padding) count in no
        activation statistic. forward() applies its 2-D ``attention_mask`` this way itself; use
        this for a tower called without one (e.g. CLIP's text encoder and its padding)."""
        if mask is None or not any(layer.collect_stats for layer in self.moram_layers.values()):
            yield
            return
        for layer in self.moram_layers.values():
            layer.token_mask = mask
        try:
            yield
        finally:
            for layer in self.moram_layers.values():
                layer.token_mask = None

    # -- the continual-learning lifecycle --------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def begin_task(self, name: str | None = None) -> None:
        """Add r fresh atoms per layer; only these are trainable until end_task()."""
        if self._open_task is not None:
            raise RuntimeError(f"begin_task(): task {self._open_task!r} is still open; call end_task() first")
        self.close_untrained_block()
        name = name or f"task-{self.num_tasks}"
        for layer in self.moram_layers.values():
            layer.begin_task(self.num_tasks)
            layer.collect_stats = self.moram_config.collect_stats
        self._open_task = name

    def end_task(self, prune: bool = True) -> TaskReport:
        """Freeze the task's atoms with the scale baked into B, post-pruning them first
        (to ``config.prune_mass`` of their activation mass) unless ``prune`` is False."""
        if self._open_task is None:
            raise RuntimeError("end_task() without begin_task()")
        coverage = self.moram_config.prune_mass if prune else None
        report = TaskReport(task=self._open_task, task_index=self.num_tasks)
        for name, layer in self.moram_layers.items():
            block = layer.end_task(coverage)
            layer.collect_stats = False
            report.added[name], report.kept[name] = block.added, block.A.shape[0]
        self.task_names.append(self._open_task)
        self._open_task = None
        return report

    @torch.no_grad()
    def open_untrained_block(self) -> None:
        """Give every layer the next task's fresh block, for evaluation only: r atoms as the
        method makes them (A kaiming-uniform, a=√5, seeded exactly as task ``num_tasks``'s training
        would seed it; B = 0), never trained. With ``route_untrained`` it takes part in routing
        (top-k, softmax, δ) while adding nothing: the model that the official TRACE code
        evaluates, whose every checkpoint is saved right after ``increment_task`` re-initialised
        the new block (Artificer-AI-Lab/MoRAM TRACE/model/Regular/MoRAM.py:81-97,
        utils/my_peft/tuners/moram.py:88-89; ``loranew_*`` saved, utils/my_peft/utils/
        save_and_load.py:94) and whose forward routes over old and new keys together
        (tuners/moram.py:110-129). load_shards(), begin_task() and close_untrained_block() drop it.
        """
        if self._open_task is not None:
            raise RuntimeError(f"open_untrained_block(): task {self._open_task!r} is open; end it first")
        if self.method.shard_mode != "append":
            raise ValueError(f"open_untrained_block(): {self.moram_config.method} trains one block for all "
                             "tasks; it has no next task's fresh block")
        self.close_untrained_block()
        for layer in self.moram_layers.values():
            layer.begin_task(self.num_tasks)
            for parameter in layer.block_parameters():
                parameter.requires_grad_(False)
        self._untrained_block = True

    def close_untrained_block(self) -> None:
        """Drop the block open_untrained_block() opened (nothing if none is open)."""
        if not self._untrained_block:
            return
        for layer in self.moram_layers.values():
            layer.drop_block()
        self._untrained_block = False

    def set_routing(self, k: int | None = None, tau: float | None = None, delta: float | None = None) -> None:
        """Change k, τ or δ of every layer in place (δ acts in eval mode only)."""
        changes = {key: value for key, value in {"k": k, "tau": tau, "delta": delta}.items() if value is not None}
        self.moram_config = self.moram_config.replace(**changes)  # validated; saved configs show it
        for layer in self.moram_layers.values():
            for key, value in changes.items():
                setattr(layer, key, value)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """PEFT-style: inside the block the model is the base model (no atom contributes, frozen
        or current), in train and eval mode; nothing is changed: weights, routing knobs and
        statistics are as before, and the atoms are back on exit, even if the block raises.

            with model.disable_adapter():
                base_logits = model(input_ids=ids).logits
        """
        # Each layer's forward is shadowed by its base module's for the block: the base output,
        # bit for bit, and no side effect of MoRAMLayer.forward (statistics, "trained" flag).
        # A layer already shadowed (a nested block) is left to the block that shadowed it.
        shadowed = [layer for layer in self.moram_layers.values() if "forward" not in layer.__dict__]
        for layer in shadowed:
            layer.forward = layer.base.forward
        try:
            yield
        finally:
            for layer in shadowed:
                del layer.forward

    @contextlib.contextmanager
    def collect_activation_stats(self) -> Iterator[None]:
        """Accumulate per-atom activation mass (Σ_tokens w_i) over the forwards inside the block,
        e.g. an eval pass over a task's data; padding tokens are excluded via attention_mask."""
        previous = {name: layer.collect_stats for name, layer in self.moram_layers.items()}
        for layer in self.moram_layers.values():
            layer.collect_stats = True
        try:
            yield
        finally:
            for name, layer in self.moram_layers.items():
                layer.collect_stats = previous[name]

    def activation_stats(self) -> dict[str, torch.Tensor]:
        """Per layer, the activation mass (float32, CPU) of every atom routed since the task
        began (or since collect_activation_stats() was entered), frozen atoms first."""
        return {name: layer.activation_mass.clone() for name, layer in self.moram_layers.items()}

    def set_activation_stats(self, stats: dict[str, torch.Tensor]) -> None:
        """Replace the statistics, e.g. with their sum over data-parallel workers."""
        for name, layer in self.moram_layers.items():
            layer.activation_mass = stats[name].detach().float().cpu()

    # -- the open task's state (checkpoints inside a task) ---------------------------------
    def open_task_state(self) -> dict[str, torch.Tensor]:
        """The open task's trainable tensors and statistics, flat (``<layer>.A``, ``.B``, the
        method's per-task tensors such as MoE-LoRA's ``.router``, ``.activation_mass``), float32 on
        CPU: a checkpoint."""
        self._require_open_task("open_task_state()")
        return {f"{name}.{key}": tensor for name, layer in self.moram_layers.items()
                for key, tensor in layer.open_state().items()}

    def load_open_task_state(self, tensors: dict[str, torch.Tensor], with_stats: bool) -> None:
        """Restore what open_task_state() returned into the open task's block. The statistics
        are restored only ``with_stats`` (they are summed over workers later: one worker may
        carry the past); the restored block has trained, so it routes."""
        self._require_open_task("load_open_task_state()")
        for name, layer in self.moram_layers.items():
            prefix = f"{name}."
            layer.load_open_state({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                                  with_stats)

    def _require_open_task(self, call: str) -> None:
        if self._open_task is None:
            raise RuntimeError(f"{call}: no task is open; call begin_task() first")

    # -- the method's regulariser ----------------------------------------------------------
    def extra_loss(self) -> torch.Tensor:
        """The method's extra loss term summed over layers (O-LoRA's orthogonality loss);
        a zero scalar for methods without one. Add it to the task loss."""
        terms = [t for t in (layer.extra_loss() for layer in self.moram_layers.values()) if t is not None]
        if not terms:
            return torch.zeros(())
        return torch.stack([t.float() for t in terms]).sum()

    # -- parameters ------------------------------------------------------------------------
    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameters, frozen atoms included in the total."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters()) + sum(
            layer.frozen_A.numel() + layer.frozen_B.numel()
            + sum(getattr(layer, f"frozen_{name}").numel() for name in layer.task_tensor_names)
            for layer in self.moram_layers.values())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.parameter_counts()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    def atom_counts(self) -> dict[str, int]:
        return {name: layer.num_frozen for name, layer in self.moram_layers.items()}

    # -- persistence -----------------------------------------------------------------------
    def export_shard(self) -> bytes:
        """The atoms and statistics of the last finished task, as safetensors bytes."""
        if not self.task_names or any(l.last_finished is None for l in self.moram_layers.values()):
            raise RuntimeError("export_shard(): no task has finished since this model was built or loaded")
        blocks = {}
        for name, layer in self.moram_layers.items():
            done = layer.last_finished
            blocks[name] = {"A": done.A, "B": done.B, "mass": done.mass, "routing_mass": done.routing_mass,
                            "kept": done.kept, **done.task_tensors}
        metadata = {
            "task": self.task_names[-1],
            "task_index": len(self.task_names) - 1,
            "method": self.moram_config.method,
            "mode": self.method.shard_mode,
            "config": self.moram_config.to_dict(),
            "added": {name: layer.last_finished.added for name, layer in self.moram_layers.items()},
        }
        return shard_to_bytes(blocks, metadata)

    def save_shard(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_bytes(self.export_shard())
        return path

    def save_pretrained(self, save_directory: str | Path, **options) -> Path:
        """PEFT-style: write only the atoms (one safetensors shard per task) and a small JSON
        config, never the base weights (see ``moram.pretrained.save_pretrained`` for options).
        Hugging Face's own keywords (``state_dict``, ``safe_serialization``, ...) are refused
        rather than silently writing the base model: call ``model.model.save_pretrained(...)``
        for that, explicitly."""
        from .pretrained import save_pretrained

        unknown = sorted(set(options) - {"shards", "base_model_id", "base_model_revision"})
        if unknown:
            raise TypeError(f"MoRAMModel.save_pretrained writes only the atoms; unexpected {unknown}. "
                            "To save the base model's weights, call model.model.save_pretrained(...) explicitly")
        return save_pretrained(self, save_directory, **options)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, source, **views) -> "MoRAMModel":
        """``base_model`` wrapped with the atoms of ``source`` (a ``save_pretrained`` folder, a
        ``moram-registry export`` folder or a memory source such as the platform's
        ``RegistrySpec``), in eval mode; ``delta=`` / ``prune_mass=`` are load-time views."""
        from .pretrained import from_pretrained

        return from_pretrained(base_model, source, **views)

    @torch.no_grad()
    def load_shards(self, shards: Iterable[Shard | bytes | str | Path], prune_mass: float | None = None) -> None:
        """Rebuild the frozen bank from shards in task order (a fresh base model + shards of a
        version = the trained model). ``prune_mass`` is a pruning view: each shard's atoms are
        cut to the smallest set covering that share of their recorded activation mass."""
        if self._open_task is not None:
            raise RuntimeError("load_shards(): a task is open; end it first")
        self.close_untrained_block()
        parsed = [s if isinstance(s, Shard) else read_shard(s) for s in shards]
        for shard in parsed:
            self._check_compatible(shard)
        for layer in self.moram_layers.values():
            layer.clear_frozen()
            layer.last_finished = None
        self.task_names = []
        for shard in parsed:
            for name, layer in self.moram_layers.items():
                if shard.mode == "replace":
                    layer.clear_frozen()
                fields = shard.layer(name)
                A, B = fields["A"], fields["B"]
                if prune_mass is not None and METHODS[shard.metadata["method"]].prunes:
                    from .functional import atoms_to_keep

                    keep = atoms_to_keep(fields["mass"].float(), prune_mass)
                    A, B = A[keep], B[:, keep]
                layer.append_frozen(A, B, {name: fields[name] for name in layer.task_tensor_names})
            self.task_names.append(shard.metadata["task"])

    def _check_compatible(self, shard: Shard) -> None:
        if shard.metadata["method"] != self.moram_config.method:
            raise ShardError(f"shard {shard.name}: method {shard.metadata['method']!r} does not match "
                             f"this model's {self.moram_config.method!r}")
        frozen_scale = shard.metadata["config"].get("frozen_scale", "baked")
        if frozen_scale != self.moram_config.frozen_scale:
            raise ShardError(f"shard {shard.name}: its B was frozen with frozen_scale={frozen_scale!r}, "
                             f"this model uses {self.moram_config.frozen_scale!r}")
        expected, found = set(self.moram_layers), set(shard.layer_names)
        if expected != found:
            missing, extra = sorted(expected - found), sorted(found - expected)
            raise ShardError(f"shard {shard.name}: layers do not match this model "
                             f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                             f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''})")
        for name, layer in self.moram_layers.items():
            fields = shard.layer(name)
            if fields["A"].shape[1] != layer.in_features or fields["B"].shape[0] != layer.out_features:
                raise ShardError(f"shard {shard.name}: layer {name} has atoms of shape "
                                 f"{tuple(fields['A'].shape)}/{tuple(fields['B'].shape)}, the model "
                                 f"needs [n, {layer.in_features}]/[{layer.out_features}, n]")
            for spec in self.method.task_tensors:  # the method's per-task tensors (MoE-LoRA's router)
                if tuple(fields.get(spec.name, torch.zeros(0)).shape) != (spec.rows, layer.in_features):
                    found = tuple(fields[spec.name].shape) if spec.name in fields else "none"
                    raise ShardError(f"shard {shard.name}: layer {name} needs its {self.moram_config.method} "
                                     f"'{spec.name}' [{spec.rows}, {layer.in_features}], found {found}")


def get_moram_model(model: nn.Module, config: MoRAMConfig) -> MoRAMModel:
    """Turn ``model`` into a MoRAM model for ``config.target_modules`` (base weights frozen)."""
    return MoRAMModel(model, config)


def _wants_split_attention(model: nn.Module, config: MoRAMConfig) -> bool:
    has_mha = any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    targets = config.target_modules
    if isinstance(targets, str):
        return has_mha and any(re.search(targets, f"attn.{p}") for p in _SPLIT_PROJECTIONS)
    return has_mha and bool(_SPLIT_PROJECTIONS & set(targets))


def _matching_modules(model: nn.Module, targets: list[str] | str) -> list[str]:
    projections = [name for name, m in model.named_modules() if name and is_projection(m)]
    if isinstance(targets, str):
        pattern = re.compile(targets)
        matched = [name for name in projections if pattern.fullmatch(name)]
    else:
        matched = [name for name in projections
                   if any(name == t or name.endswith("." + t) for t in targets)]
    if not matched:
        suffixes = sorted({name.rsplit(".", 1)[-1] for name in projections})
        raise MoRAMConfigError(
            f"target_modules: {targets!r} matches no nn.Linear/Conv1D module of this model; "
            f"its projection names are {suffixes}")
    return matched
