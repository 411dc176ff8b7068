"""The C++ build of MoRAM's inference update (csrc/route_value.cpp), as DeepSpeed builds its ops.

``make install`` builds it once (.ci/check_install.py calls ``build()``) with torch's own
extension builder; the result is cached under TORCH_EXTENSIONS_DIR (default
~/.cache/torch_extensions) in a folder named after a hash of the source, the flags and the
torch version, so later processes import the cached library directly (no compiler run) and a
changed source or torch builds anew. Where it cannot be built (no C++ compiler or ninja), or
with MORAM_CPU_OP=0, ``route_value`` is the pure-PyTorch ``route_value_reference`` and the log
says so once.
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger("moram.kernels")

SOURCE = Path(__file__).parent / "csrc" / "route_value.cpp"
# -O3 without -march: the cached build may serve another CPU of the same image (no SIGILL);
# the value loop is a plain axpy the compiler vectorises for the baseline ISA.
CFLAGS = ["-O3"]
_state: dict[str, object] = {}


def _name() -> str:
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode() + torch.__version__.encode())
    return f"moram_route_value_{digest.hexdigest()[:12]}"


def _cache_dir() -> Path:
    from_env = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(from_env) if from_env else Path.home() / ".cache" / "torch_extensions"


def _import_cached(name: str):
    library = _cache_dir() / name / f"{name}.so"
    if not library.is_file():
        return None
    spec = importlib.util.spec_from_file_location(name, library,
                                                  loader=importlib.machinery.ExtensionFileLoader(name, str(library)))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(verbose: bool = False):
    """The op's module, from the cache or compiled now (~30 s); None where impossible."""
    if "module" in _state:
        return _state["module"]
    module, reason = None, None
    if os.environ.get("MORAM_CPU_OP", "1") == "0":
        reason = "MORAM_CPU_OP=0"
    else:
        name = _name()
        try:
            module = _import_cached(name)
            if module is None:
                from torch.utils import cpp_extension

                module = cpp_extension.load(name, [str(SOURCE)], extra_cflags=CFLAGS, verbose=verbose,
                                            build_directory=str(_ensure(_cache_dir() / name)))
        except Exception as error:  # noqa: BLE001 - any build failure means: use the fallback
            lines = str(error).strip().splitlines()
            reason = f"{type(error).__name__}: {lines[-1] if lines else ''}"
    if module is None:
        logger.warning("moram: the C++ inference op is not available (%s); using the PyTorch path", reason)
    _state["module"] = module
    return module


def _ensure(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def available() -> bool:
    return build() is not None
