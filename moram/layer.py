"""MoRAMLayer: a frozen base projection plus a growing bank of rank-1 atoms.

The bank holds the frozen atoms of every finished task (buffers, scale already baked into B)
and the current task's trainable block (parameters, scaled by alpha/r while it trains).
Routing (Eqs. 5-8) always runs over old and new atoms together; the baselines reuse the
same bank with other mixture weights, so every method runs on one code path. What differs
between methods lives in a strategy object (``moram.methods``), never in this class.

Layout (docs/performance.md): the frozen atoms live in one contiguous bank whose capacity
doubles when a task's atoms do not fit: keys as rows [capacity, d_in], values as rows
[capacity, d_out] (scale baked in); ``frozen_A``/``frozen_B`` are views of the filled part.
With ``fast_path="auto"`` the forward never concatenates weight matrices: the keys and the
values of the frozen bank and of the trainable block are applied apart, and the method's
``update`` turns the key responses into y + Δy (MoRAM: compact routing,
``moram.kernels.fused_route_topk``, the Triton kernel on CUDA, and the value of the kept atoms;
at inference ``moram.kernels.route_value``, one call). In eval mode the frozen keys are rows of
the base projection: the base weight is a view of one [d_out + capacity, d_in] storage whose
later rows are the bank's keys, so ``x · [W0; A_frozen]ᵀ`` is one GEMM giving y and h (exact:
no dropout in eval; the weight is not duplicated).
``fast_path="off"`` is the equations as written (concatenated bank, dense route and value).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from . import functional as MF
from . import kernels
from .config import MoRAMConfig
from .methods import method_for


@dataclass
class FinishedBlock:
    """The atoms one task added to one layer, as frozen (what a shard stores)."""

    A: torch.Tensor                 # [n, d_in]
    B: torch.Tensor                 # [d_out, n], scale baked in (frozen_scale="baked")
    mass: torch.Tensor              # [n] activation mass of the kept atoms during the task
    routing_mass: torch.Tensor      # [R at the task] mass of every routed atom (heatmaps)
    kept: torch.Tensor              # [n] indices of the kept atoms in the task's block
    added: int                      # atoms the task trained (before pruning)
    # the method's per-task tensors (``Method.task_tensors``), e.g. MoE-LoRA's "router" [1, d_in]
    task_tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def base_features(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of nn.Linear or transformers' GPT-2 Conv1D."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if type(base).__name__ == "Conv1D" and base.weight.dim() == 2:
        d_in, d_out = base.weight.shape  # Conv1D stores W as [in, out]: y = x @ W + b
        return d_in, d_out
    raise TypeError(f"MoRAM wraps nn.Linear or transformers Conv1D, not {type(base).__name__}")


def is_projection(module: nn.Module) -> bool:
    """Whether MoRAM can wrap ``module`` (what ``base_features`` accepts)."""
    try:
        base_features(module)
        return True
    except (TypeError, AttributeError):
        return False


class _ServingPlan:
    """MoRAM's inference update over a frozen bank with everything looked up once: the joint
    [W0; A_frozen] rows, the value rows and the C++ op. Per decoded token a wrapped layer is
    ~50 µs of Python and view-making around a ~50 µs GEMV at SmolLM2's shapes (docs/performance.md),
    so the checks that ``forward`` makes on every call are made here once; the layer drops the plan
    whenever anything it read changes (mode, bank, open block, move or cast, a re-join)."""

    __slots__ = ("base", "weight", "bias", "values", "d_out", "n_atoms", "dtype", "pointer", "op")

    def __init__(self, layer: "MoRAMLayer", joint: tuple[torch.Tensor, torch.Tensor | None], op) -> None:
        self.base, (self.weight, self.bias), self.op = layer.base, joint, op
        self.values = layer.frozen_values
        self.d_out, self.n_atoms = layer.out_features, layer.num_frozen
        self.dtype, self.pointer = self.weight.dtype, layer.base.weight.data_ptr()

    def applies(self, x: torch.Tensor) -> bool:
        base = self.base
        return x.dtype is self.dtype and x.device.type == "cpu" and base.weight.data_ptr() == self.pointer \
            and not (x.requires_grad and torch.is_grad_enabled()) and not base._forward_hooks \
            and not base._forward_pre_hooks and not torch.compiler.is_compiling()

    def __call__(self, x: torch.Tensor, k: int, tau: float, delta: float | None, eps: float) -> torch.Tensor:
        rows = F.linear(x, self.weight, self.bias).view(-1, self.d_out + self.n_atoms)
        out = self.op(rows.narrow(1, 0, self.d_out), rows.narrow(1, self.d_out, self.n_atoms), self.values,
                      MF.effective_k(k, self.n_atoms),
                      float(tau), float(delta) if delta else 0.0, float(eps))
        return out.view(*x.shape[:-1], self.d_out)


class MoRAMLayer(nn.Module):
    def __init__(self, base: nn.Module, config: MoRAMConfig, name: str = ""):
        super().__init__()
        self.base = base
        self.config = config
        self.method = method_for(config.method)
        self.name = name
        self.in_features, self.out_features = base_features(base)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        # Routing knobs; set_routing() changes them without touching the config object.
        self.k, self.tau, self.delta = config.k, config.tau, config.delta

        dtype = self._atom_dtype()
        device = base.weight.device
        # The frozen bank: rows [capacity, d_in] / [capacity, d_out], the first num_frozen filled.
        # Not persistent as such: state_dict stores only the filled part, as frozen_A [R, d_in]
        # and frozen_B [d_out, R] (_save_to_state_dict / _load_from_state_dict below).
        self.register_buffer("bank_keys", torch.zeros(0, self.in_features, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("bank_values", torch.zeros(0, self.out_features, dtype=dtype, device=device),
                             persistent=False)
        self._num_frozen = 0
        # In eval, the storage [d_out + capacity, d_in] of which base.weight and bank_keys are
        # views (``_joint_projection``); None until then, or when a move/cast separated them.
        self._joint: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._serving: _ServingPlan | None = None  # built at the first eligible eval forward
        # The method's per-task tensors: frozen rows of every finished task (``frozen_<name>``),
        # each frozen atom's task (``frozen_block``), and the open block's parameter ``<name>``.
        # Non-persistent: state_dict stores their filled part, as it does the bank's.
        self.task_tensor_names = tuple(t.name for t in self.method.task_tensors)
        for name in self.task_tensor_names:
            self.register_buffer(f"frozen_{name}", torch.zeros(0, self.in_features, dtype=dtype, device=device),
                                 persistent=False)
            setattr(self, name, None)
        self.register_buffer("frozen_block", torch.zeros(0, dtype=torch.long, device=device), persistent=False)
        self._num_blocks = 0

        self.A: nn.Parameter | None = None
        self.B: nn.Parameter | None = None
        self.task_index = -1
        self.current_trained = False       # a block takes part in routing once it has trained
        # (or from the start with route_untrained, as the official code does)
        self.last_finished: FinishedBlock | None = None

        # Statistics are plain attributes, not buffers: they must stay float32 when the model
        # is cast to bf16, and they never belong in a checkpoint of the weights.
        self.collect_stats = False
        self.token_mask: torch.Tensor | None = None
        self._mass = torch.zeros(0)

    # -- what the wrapped layer looks like from outside ------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def _atom_dtype(self) -> torch.dtype:
        dtype = self.base.weight.dtype
        return dtype if dtype.is_floating_point else torch.float32

    @property
    def num_frozen(self) -> int:
        return self._num_frozen

    @property
    def frozen_A(self) -> torch.Tensor:
        """The frozen keys [R, d_in] (a view of the bank)."""
        return self.bank_keys[: self._num_frozen]

    @property
    def frozen_B(self) -> torch.Tensor:
        """The frozen values [d_out, R], scale baked in (a view of the bank's rows, transposed)."""
        return self.bank_values[: self._num_frozen].t()

    @property
    def frozen_values(self) -> torch.Tensor:
        """The frozen values as rows [R, d_out] (contiguous): what the value projection reads."""
        return self.bank_values[: self._num_frozen]

    @property
    def fast(self) -> bool:
        return self.config.fast_path == "auto"

    @property
    def num_current(self) -> int:
        return 0 if self.A is None else self.A.shape[0]

    @property
    def current_routes(self) -> bool:
        """Atoms never trained take no part in routing (DESIGN: growth and freezing), unless
        ``route_untrained``: the official code routes a fresh block from the start (its forward
        concatenates ``loranew_A`` to the old keys unconditionally, TRACE/utils/my_peft/tuners/
        moram.py:110-119 of Artificer-AI-Lab/MoRAM)."""
        if self.A is None:
            return False
        return self.current_trained or self.config.route_untrained or (self.training and torch.is_grad_enabled())

    @property
    def num_routed(self) -> int:
        return self.num_frozen + (self.num_current if self.current_routes else 0)

    # -- task lifecycle --------------------------------------------------------------------
    def begin_task(self, task_index: int) -> None:
        """Open task ``task_index``'s trainable block, as the method makes it (usually r fresh
        atoms); everything older stays frozen."""
        if self.A is not None:
            raise RuntimeError(f"{self.name}: begin_task() while task {self.task_index} is still open")
        self.task_index = task_index
        self.current_trained = False
        self._serving = None
        self.method.begin_task(self, task_index)
        if self.A is not None:  # a fresh block: the method's per-task tensors start at zero
            for spec in self.method.task_tensors:
                setattr(self, spec.name, nn.Parameter(self.bank_keys.new_zeros(spec.rows, self.in_features)))
        self.reset_stats()

    def block_parameters(self) -> list[nn.Parameter]:
        """The open block's trainable tensors: A, B and the method's per-task tensors."""
        tensors = [self.A, self.B, *(getattr(self, name) for name in self.task_tensor_names)]
        return [t for t in tensors if t is not None]

    def drop_block(self) -> None:
        """Forget the open block (A, B, per-task tensors) without freezing anything."""
        self._serving = None
        self.A = self.B = None
        for name in self.task_tensor_names:
            setattr(self, name, None)
        self.current_trained = False

    def new_block(self, task_index: int) -> None:
        """r fresh trainable atoms: A kaiming-uniform (a=√5), B zero."""
        r, device, dtype = self.config.r, self.frozen_A.device, self.frozen_A.dtype
        generator = torch.Generator().manual_seed(self._init_seed(task_index))
        A = torch.empty(r, self.in_features)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        self.A = nn.Parameter(A.to(device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=dtype))

    def thaw_all(self) -> None:
        """Turn the whole frozen bank back into the trainable block (SeqLoRA)."""
        self._serving = None
        self.A = nn.Parameter(self.frozen_A.clone())
        baked = self.frozen_scale_factor
        B = self.frozen_B / baked if baked is not None else self.frozen_B
        self.B = nn.Parameter(B.clone(memory_format=torch.contiguous_format))
        self._num_frozen = 0
        self.current_trained = True  # it has trained already: it keeps routing

    def _init_seed(self, task_index: int) -> int:
        # Same atoms on every data-parallel worker; different atoms for every task and layer.
        return (self.config.seed * 1_000_003 + task_index * 7919 + zlib.crc32(self.name.encode())) % (2**63)

    @property
    def frozen_scale_factor(self) -> float | None:
        """alpha/r, baked into B when atoms freeze; None with frozen_scale="official", which
        stores B unscaled as the official TRACE code does (Artificer-AI-Lab/MoRAM,
        TRACE/utils/my_peft/tuners/moram.py:79 copies ``loranew_B`` into ``lora_B`` as is,
        while its forward scales only the new block, lines 147-148): a frozen atom then
        weighs r/alpha times what it did while training (half, with alpha = 2r)."""
        return self.config.scale if self.config.frozen_scale == "baked" else None

    @torch.no_grad()
    def end_task(self, prune_mass: float | None) -> FinishedBlock:
        """Freeze the current block with the scale baked into B, pruning it first if asked
        and the method prunes."""
        if self.A is None:
            raise RuntimeError(f"{self.name}: end_task() without begin_task()")
        added = self.num_current
        mass = self._current_mass()
        keep = torch.arange(added)
        if prune_mass is not None and self.method.prunes and self.current_trained:
            keep = MF.atoms_to_keep(mass, prune_mass)
        device = self.A.device
        A = self.A.detach()[keep.to(device)].clone()
        baked = self.frozen_scale_factor
        B = (self.B.detach() * baked if baked is not None else self.B.detach())[:, keep.to(device)].clone()
        extras = {name: getattr(self, name).detach().clone() for name in self.task_tensor_names
                  if getattr(self, name) is not None}
        self.last_finished = FinishedBlock(
            A=A, B=B, mass=mass[keep].clone(), routing_mass=self.activation_mass.clone(),
            kept=keep.clone(), added=added, task_tensors=extras,
        )
        self.append_frozen(A, B, extras)
        self.drop_block()
        return self.last_finished

    def _current_mass(self) -> torch.Tensor:
        mass = self.activation_mass
        if mass.numel() < self.num_frozen + self.num_current:
            return torch.zeros(self.num_current)
        return mass[self.num_frozen:].clone()

    @torch.no_grad()
    def append_frozen(self, A: torch.Tensor, B: torch.Tensor,
                      task_tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        """Add one finished block to the frozen bank: keys A [n, d_in], values B [d_out, n]
        (scale baked in) and the method's per-task tensors of that block (name -> [rows, d_in])."""
        self._serving = None
        dtype, device = self.bank_keys.dtype, self.bank_keys.device
        start, end = self._num_frozen, self._num_frozen + A.shape[0]
        if end > self.bank_keys.shape[0]:
            self._grow_bank(end)
        self.bank_keys[start:end] = A.to(device=device, dtype=dtype)
        self.bank_values[start:end] = B.t().to(device=device, dtype=dtype)
        self._num_frozen = end
        task_tensors = task_tensors or {}
        missing = [name for name in self.task_tensor_names if name not in task_tensors]
        if missing:
            raise ValueError(f"{self.name}: a {self.method.name} block needs its per-task tensors {missing}")
        for name in self.task_tensor_names:
            frozen = getattr(self, f"frozen_{name}")
            setattr(self, f"frozen_{name}", torch.cat([frozen, task_tensors[name].to(device=device, dtype=dtype)]))
        tags = torch.full((A.shape[0],), self._num_blocks, dtype=torch.long, device=device)
        self.frozen_block = torch.cat([self.frozen_block, tags])
        self._num_blocks += 1

    def _grow_bank(self, needed: int) -> None:
        """At least double the capacity (amortised O(1) appends), keeping the filled rows. The
        keys leave the joint storage (the next eval forward joins them again)."""
        capacity = max(needed, 2 * self.bank_keys.shape[0])
        for name in ("bank_keys", "bank_values"):
            old = getattr(self, name)
            grown = old.new_zeros(capacity, old.shape[1])
            grown[: self._num_frozen] = old[: self._num_frozen]
            setattr(self, name, grown)
        self._joint = None

    @torch.no_grad()
    def clear_frozen(self) -> None:
        self._serving = None
        self._num_frozen = 0
        for name in self.task_tensor_names:
            setattr(self, f"frozen_{name}", getattr(self, f"frozen_{name}")[:0].clone())
        self.frozen_block = self.frozen_block[:0].clone()
        self._num_blocks = 0

    # -- statistics ------------------------------------------------------------------------
    # The mass accumulates where the routing runs and moves to the host only when read (end of
    # task, checkpoints): on a GPU a .cpu() per wrapped layer per forward would be a host sync.
    @property
    def activation_mass(self) -> torch.Tensor:
        """Each routed atom's activation mass so far [R at most], float32 on the CPU."""
        if self._mass.device.type != "cpu":
            self._mass = self._mass.cpu()
        return self._mass

    @activation_mass.setter
    def activation_mass(self, mass: torch.Tensor) -> None:
        self._mass = mass

    def reset_stats(self) -> None:
        self._mass = torch.zeros(0)

    def accumulate(self, w: torch.Tensor, x: torch.Tensor) -> None:
        """Add the weights w [..., R] of real tokens to each routed atom's activation mass."""
        mask = self.token_mask
        if mask is not None and tuple(mask.shape) != tuple(x.shape[:-1]):
            mask = None  # a layer that does not see [batch, seq] tokens
        self._add_mass(MF.activation_mass(w, mask))

    def _add_mass(self, mass: torch.Tensor) -> None:
        """Add ``mass`` (float32, on the routing's device) to the first atoms' running mass."""
        total = self._mass
        if total.device != mass.device:  # a read moved it to the host (or the model moved)
            total = total.to(mass.device)
        if total.numel() < mass.numel():  # the current block joined routing
            total = torch.cat([total, total.new_zeros(mass.numel() - total.numel())])
        total[: mass.numel()] += mass
        self._mass = total

    def accumulate_kept(self, idx: torch.Tensor, w_kept: torch.Tensor, n_atoms: int, x: torch.Tensor) -> None:
        """The activation mass from the compact routing: each kept weight added to its atom."""
        mask = self.token_mask
        w_kept = w_kept.detach().float()
        if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
            w_kept = w_kept * mask.to(w_kept.dtype).unsqueeze(-1)
        self._add_mass(w_kept.new_zeros(n_atoms).index_add_(0, idx.reshape(-1), w_kept.reshape(-1)))

    # -- the open task's state (checkpoints inside a task) ---------------------------------
    def open_state(self) -> dict[str, torch.Tensor]:
        """The current block (A, B, the method's per-task tensors; float32 on CPU) and its
        activation mass."""
        state = {"A": self.A, "B": self.B, **{name: getattr(self, name) for name in self.task_tensor_names}}
        state = {k: v.detach().float().cpu().contiguous() for k, v in state.items() if v is not None}
        state["activation_mass"] = self.activation_mass.contiguous()
        return state

    @torch.no_grad()
    def load_open_state(self, state: dict[str, torch.Tensor], with_stats: bool) -> None:
        self.A.copy_(state["A"])
        self.B.copy_(state["B"])
        for name in self.task_tensor_names:
            if getattr(self, name) is not None:
                getattr(self, name).copy_(state[name])
        self.activation_mass = state["activation_mass"].clone() if with_stats else torch.zeros(0)
        self.current_trained = True

    # -- state_dict: only the filled part of the bank, under the historic names -------------
    # frozen_A [R, d_in], frozen_B [d_out, R]; with per-task tensors also frozen_<name> and
    # frozen_block (before issue 23.2 MoE-LoRA's were frozen_router and frozen_expert: read too).
    _LEGACY_KEYS = {"frozen_expert": "frozen_block"}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "frozen_A"] = self.frozen_A.clone()
        destination[prefix + "frozen_B"] = self.frozen_B.contiguous()
        if self.task_tensor_names:
            for name in self.task_tensor_names:
                destination[prefix + f"frozen_{name}"] = getattr(self, f"frozen_{name}").clone()
            destination[prefix + "frozen_block"] = self.frozen_block.clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        keys = [prefix + "frozen_A", prefix + "frozen_B"]
        extra = {name: prefix + f"frozen_{name}" for name in self.task_tensor_names}
        block_key = next((prefix + k for k in ("frozen_block", "frozen_expert") if prefix + k in state_dict),
                         prefix + "frozen_block")
        ours = [*keys, *extra.values(), block_key, prefix + "frozen_router", prefix + "frozen_expert"]
        for key in ours:
            if key in unexpected_keys:
                unexpected_keys.remove(key)
        needed = keys + ([*extra.values(), block_key] if extra else [])
        if all(key in state_dict for key in needed):
            with torch.no_grad():
                self.clear_frozen()
                self.append_frozen(state_dict[keys[0]], state_dict[keys[1]],
                                   {name: state_dict[key][:0] for name, key in extra.items()})
                if extra:  # the blocks as saved, not one block
                    for name, key in extra.items():
                        setattr(self, f"frozen_{name}", state_dict[key].to(self.bank_keys))
                    self.frozen_block = state_dict[block_key].to(device=self.bank_keys.device, dtype=torch.long)
                    first = self.method.task_tensors[0]
                    self._num_blocks = getattr(self, f"frozen_{first.name}").shape[0] // first.rows
        elif strict:
            missing_keys.extend(key for key in needed if key not in state_dict)

    def train(self, mode: bool = True) -> "MoRAMLayer":
        self._serving = None
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        self._serving = None  # a move or a cast: the plan's tensors are the old ones
        return super()._apply(fn, recurse)

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        plan = self._serving
        if plan is not None and not args and not kwargs and not self.collect_stats and plan.applies(x):
            return plan(x, self.k, self.tau, self.delta, self.config.eps)
        current = self.current_routes
        if self.training and current and torch.is_grad_enabled() and not self.current_trained:
            self.current_trained = True
        if self._num_frozen + (self.num_current if current else 0) == 0:
            return self.base(x, *args, **kwargs)
        if not self.fast:
            y = self.base(x, *args, **kwargs)
            return y + self._reference_delta(x, current).to(y.dtype)
        if current and self.training and torch.is_grad_enabled() and self.method.trains_fused(x):
            y = self.base(x, *args, **kwargs)  # before the dropout, as in _base_and_responses
            return self.method.training_update(self, self.dropout(x).to(self.bank_keys.dtype), y)
        y, h, x_atoms = self._base_and_responses(x, current, args, kwargs)
        out = self.method.update(self, h, x_atoms, y, current)
        self._plan_serving(x, current, args, kwargs, h)
        return out

    def _plan_serving(self, x, current, args, kwargs, h) -> None:
        """After an eval forward that took the joint GEMM and the C++ op, keep what it looked up
        (``_ServingPlan``) for the next ones."""
        if self.training or current or args or kwargs or self.collect_stats or self._joint is None \
                or not self.method.serves_with_route_value or not kernels.uses_cpu_op(h) \
                or x.dtype != self.bank_keys.dtype or (x.requires_grad and torch.is_grad_enabled()):
            return
        joint = self._joint_projection()
        if joint is not None:
            self._serving = _ServingPlan(self, joint, kernels.cpu_op.build().route_value)

    def _reference_delta(self, x: torch.Tensor, current: bool) -> torch.Tensor:
        """fast_path="off": the equations as written, over the concatenated bank."""
        A, B = self.frozen_A, self.frozen_B
        if current:
            A = torch.cat([A, self.A])
            B = torch.cat([B, self.B * self.config.scale], dim=1)
        x_atoms = self.dropout(x).to(A.dtype)
        h = x_atoms @ A.t()                                          # Eq. 3
        w = self.mixture_weights(h, x_atoms, current)
        if self.collect_stats:
            self.accumulate(h.new_ones(h.shape) if w is None else w, x)
        mixed = h if w is None else w * h                            # Eq. 4: w ⊙ h
        return mixed @ B.t()

    def _base_and_responses(self, x, current, args, kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The base output y, the routed atoms' key responses h [..., R] (Eq. 3) and the input
        after dropout: in eval one GEMM x · [W0; A_frozen]ᵀ (y and h are views of it), else the
        base and the keys apart (frozen bank and trainable block apart: no gradient is built for
        the frozen keys). The base runs before the dropout, as it always has: the order in which
        autograd sums x's gradients follows it (bit-identical training)."""
        joint = None if self.training or args or kwargs or x.dtype != self.bank_keys.dtype else self._joint_projection()
        parts = []
        if joint is not None:
            yh = F.linear(x, *joint)
            y, frozen_h = yh.split([self.out_features, self._num_frozen], dim=-1)
            parts.append(frozen_h)
            x_atoms = self.dropout(x)
        else:
            y = self.base(x, *args, **kwargs)
            x_atoms = self.dropout(x).to(self.bank_keys.dtype)
            if self._num_frozen:
                parts.append(x_atoms @ self.frozen_A.t())
        if current:
            parts.append(x_atoms @ self.A.t())
        return y, parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1), x_atoms

    def _joint_projection(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(weight [d_out + R, d_in], bias [d_out + R] or None) whose first d_out rows are the base
        projection's and the rest the frozen keys (bias 0 there), sharing storage with
        base.weight/base.bias and bank_keys; joined here on first use and again after anything
        (a move, a cast, a growing bank) separated them. None where it does not apply: another
        base than nn.Linear, hooks on it, weights of another dtype or device than the bank."""
        base = self.base
        if type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks or not self._num_frozen \
                or torch.compiler.is_compiling():
            return None
        weight, bias, keys = base.weight, base.bias, self.bank_keys
        if weight.dtype != keys.dtype or weight.device != keys.device:
            return None
        if self._joint is None or self._joint[0].data_ptr() != weight.data_ptr() \
                or keys.data_ptr() != weight.data_ptr() + weight.numel() * weight.element_size() \
                or (bias is not None and (self._joint[1] is None or self._joint[1].data_ptr() != bias.data_ptr())):
            self._join_base_and_keys()
        rows = self.out_features + self._num_frozen
        joint_weight, joint_bias = self._joint
        return joint_weight[:rows], None if joint_bias is None else joint_bias[:rows]

    @torch.no_grad()
    def _join_base_and_keys(self) -> None:
        """One storage [d_out + capacity, d_in]: base.weight (the same Parameter) and bank_keys
        become views of its rows, as does base.bias of a [d_out + capacity] one (zeros after)."""
        with torch.inference_mode(False):  # normal tensors: the base weight trains models later
            self._join_storage()

    def _join_storage(self) -> None:
        self._serving = None
        base, d_out, capacity = self.base, self.out_features, self.bank_keys.shape[0]
        weight = base.weight.new_empty(d_out + capacity, self.in_features)
        weight[:d_out] = base.weight
        weight[d_out:] = self.bank_keys
        base.weight.data = weight[:d_out]
        self.bank_keys = weight[d_out:]
        bias = None
        if base.bias is not None:
            bias = base.bias.new_zeros(d_out + capacity)
            bias[:d_out] = base.bias
            base.bias.data = bias[:d_out]
        self._joint = (weight, bias)

    def current_values(self) -> torch.Tensor:
        """The open block's values [d_out, r] with its training scale alpha/r."""
        return self.B * self.config.scale

    def dense_update(self, mixed: torch.Tensor, current: bool, y: torch.Tensor) -> torch.Tensor:
        """y + [frozen values | current values] · mixed, as addmm's onto y (no concatenated bank)."""
        current_B = self.current_values() if current else None
        if mixed.dtype != y.dtype:  # atoms kept in another dtype than the base: add at the end
            value = self.dense_update(mixed, current, mixed.new_zeros(*mixed.shape[:-1], y.shape[-1]))
            return y + value.to(y.dtype)
        n_frozen = self._num_frozen
        out = y.reshape(-1, y.shape[-1])
        rows = mixed.reshape(-1, mixed.shape[-1])
        # In place onto y only without autograd and when y is its own tensor (not a view of the
        # joint eval GEMM); with autograd, onto the first addmm's own fresh output (addmm's
        # backward does not read its output). Never under autocast: it casts addmm's inputs, not
        # an in-place addmm_'s.
        autocast = torch.is_autocast_enabled(y.device.type)
        in_place = not torch.is_grad_enabled() and not autocast and y.is_contiguous()
        if current_B is not None:
            current = rows[:, n_frozen:]
            out = out.addmm_(current, current_B.t()) if in_place else torch.addmm(out, current, current_B.t())
            in_place = not autocast
        if n_frozen:
            frozen = rows[:, :n_frozen]
            out = out.addmm_(frozen, self.frozen_values) if in_place else torch.addmm(out, frozen, self.frozen_values)
        return out.view(y.shape)

    @staticmethod
    def add_residual(y: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """y + value, reusing a buffer where autograd allows: y itself without autograd (when it
        is its own tensor), else ``value`` (the layer's own fresh output of embedding_bag/addmm,
        whose backward does not read it)."""
        if value.dtype != y.dtype or value.shape != y.shape:
            return y + value.to(y.dtype)
        if not torch.is_grad_enabled():
            return y.add_(value) if y.is_contiguous() else value.add_(y)
        return value.add_(y)

    def mixture_weights(self, h: torch.Tensor, x: torch.Tensor, current: bool) -> torch.Tensor | None:
        """w over the routed atoms; None means every atom counts fully (the LoRA baselines)."""
        return self.method.mixture_weights(self, h, x, current)

    def extra_loss(self) -> torch.Tensor | None:
        """The method's regulariser for this layer's open block (None: none)."""
        return self.method.extra_loss(self)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, frozen_atoms={self.num_frozen}, "
                f"current_atoms={self.num_current}, method={self.method.name}")

