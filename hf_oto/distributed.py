"""Which multi-process setups OTO supports, and a check that refuses the others before any training step.

HSPG needs every group's norm, i.e. whole parameters, on the rank that takes the step:

| setup (`accelerate` `DistributedType`) | OTO |
|---|---|
| one process (`NO`), DDP on CPUs or GPUs (`MULTI_CPU`, `MULTI_GPU`, `MULTI_XPU`, ...) | supported: every rank holds the whole parameters and the same all-reduced gradients, so every rank takes the identical HSPG step and zeroes the identical groups |
| `FSDP` | refused: parameters are sharded across ranks, so one rank's group norms and half-space test would be those of a shard |
| `DEEPSPEED` | refused: DeepSpeed builds its own optimizer from its config (HSPG would be silently bypassed) or wraps the given one in a ZeRO optimizer that partitions parameters and their state |
| `MEGATRON_LM` | refused: tensor parallelism splits the very rows and heads that make up the groups |
"""

from __future__ import annotations

from typing import Any

from transformers.utils import logging


logger = logging.get_logger(__name__)

UNSUPPORTED_DISTRIBUTED_TYPES = {
    "FSDP": (
        "FSDP shards the parameters across ranks, so the group norms and the half-space test of HSPG would be "
        "computed on shards and be wrong"
    ),
    "DEEPSPEED": (
        "DeepSpeed either builds its own optimizer from its config (HSPG would be silently bypassed: no zero groups) "
        "or wraps the given one in a ZeRO optimizer that partitions the parameters and their state"
    ),
    "MEGATRON_LM": "Megatron-LM tensor parallelism splits the rows and heads that make up the zero-invariant groups",
}
"""`accelerate.DistributedType` names OTO refuses, with the reason."""


def check_distributed_support(distributed_type: Any) -> None:
    """Raises a `ValueError` for a multi-process setup in which HSPG would train wrongly (FSDP, DeepSpeed,
    Megatron-LM); one process and DDP pass.

    Args:
        distributed_type (`accelerate.DistributedType` or `str`):
            The setup, e.g. `accelerator.distributed_type` or `trainer.accelerator.distributed_type`.

    Example:

    ```python
    >>> from accelerate import Accelerator
    >>> from hf_oto.distributed import check_distributed_support

    >>> check_distributed_support(Accelerator(cpu=True).distributed_type)  # one process: fine
    >>> check_distributed_support("FSDP")
    Traceback (most recent call last):
    ...
    ValueError: OTO does not support FSDP: FSDP shards the parameters across ranks, ...
    ```
    """
    name = str(getattr(distributed_type, "value", distributed_type)).upper()
    reason = UNSUPPORTED_DISTRIBUTED_TYPES.get(name)
    if reason is not None:
        raise ValueError(
            f"OTO does not support {name}: {reason}. Train with data parallel instead (DDP: `accelerate launch "
            "--multi_gpu --num_processes N script.py` or `torchrun --nproc_per_node N script.py`); with the Trainer, "
            "drop the `fsdp`/`deepspeed` arguments."
        )
