"""Where and how training runs: the device, seeding, cuDNN's determinism, mixed precision, and an out-of-memory error
that says what to change.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from monai.utils import set_determinism

from fedseg.train.training.settings import TrainingSettings, TrainSettings


def select_device(preferred: str | None = None) -> torch.device:
    """CUDA when present (or as asked), else CPU; never a hard-coded `cuda:0`."""
    if preferred:
        return torch.device(preferred)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    """Seeds Python, numpy and torch (MONAI's helper) so a run can be repeated."""
    set_determinism(seed=seed)


def configure_cudnn(train: TrainSettings) -> bool:
    """cuDNN's kernel choice for the profile's `train.deterministic` (base profile: true); returns whether cuDNN
    benchmarks its convolution kernels.

    MONAI's `set_determinism` (called by `seed_everything`) turns benchmarking off for the whole process.
    `deterministic: false` (the paper profile) turns it back on: cuDNN times its kernels for each shape once and
    keeps the fastest, and a GPU run's numbers then vary in their last bits from run to run. No effect on a CPU.
    """
    fast = not bool(train.deterministic)
    torch.backends.cudnn.benchmark = fast
    torch.backends.cudnn.deterministic = not fast
    return fast


def autocast(device: torch.device, train: TrainSettings):
    """Mixed precision on GPU when the profile allows it (`amp`); on CPU bfloat16 autocast only when the
    profile asks (`cpu_bf16`) and the CPU has native bfloat16 (AVX512-BF16 / AMX), else full precision."""
    if device.type == "cuda" and train.amp:
        return torch.autocast("cuda", dtype=torch.float16)
    if device.type == "cpu" and train.cpu_bf16 and cpu_has_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (oneDNN's check), where bf16 autocast pays off."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _memory_hint(settings: TrainingSettings, error: BaseException) -> RuntimeError:
    pre, train = settings.preprocess, settings.train
    return RuntimeError(
        f"Out of memory in training ({type(error).__name__}): lower preprocess.patch_size (now {pre.patch_size}), "
        f"train.cases_per_step (now {train.cases_per_step}) or preprocess.patches_per_volume "
        f"(now {pre.patches_per_volume}), e.g. with -p or a profile copy; train.sw_batch_size "
        f"(now {train.sw_batch_size}) if it happened in validation."
    )


def _is_out_of_memory(error: BaseException) -> bool:
    return (isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)
            or "out of memory" in str(error))
