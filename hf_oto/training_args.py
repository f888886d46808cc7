"""`OTOArguments` (the HSPG and zero-invariant group knobs) and `OTOTrainingArguments`, the `TrainingArguments` of an
OTO run that adds them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from transformers import TrainingArguments
from transformers.utils import logging

from .distributed import check_distributed_support


logger = logging.get_logger(__name__)

OTO_FAMILIES = ("heads", "ffn", "channels")
OTO_VARIANTS = ("adamw", "sgd")
DEFAULT_INIT_FRACTION = 0.5
"""Fraction of the training steps spent in the initialization stage when neither `oto_init_steps` nor
`oto_init_fraction` is given."""


@dataclass
class OTOArguments:
    r"""
    The knobs of Only Train Once, on their own: the HSPG hyper-parameters and which zero-invariant groups to train.
    [`OTOTrainingArguments`] adds them to the `Trainer`'s arguments; a training loop of your own (e.g.
    `scripts/run_text_classification_oto_no_trainer.py` with Accelerate) parses them next to its other arguments with
    `HfArgumentParser` and builds HSPG with [`OTOArguments.hspg_kwargs`].

    Parameters:
        oto_lambda (`float`, *optional*, defaults to `1e-3`):
            Weight λ > 0 of the group-lasso term; a larger λ gives more zero groups and a larger bias.
        oto_epsilon (`float`, *optional*, defaults to `0.0`):
            Aggressiveness ε ∈ [0, 1) of the half-space projection; the paper keeps it at 0.
        oto_init_steps (`int`, *optional*):
            Number of optimizer steps of the initialization stage (plain (sub)gradient steps) before the half-space
            stage starts. When given, it wins over `oto_init_fraction`.
        oto_init_fraction (`float`, *optional*):
            Length of the initialization stage as a fraction in [0, 1] of the total number of optimizer steps (known
            once training starts; rounded down). Used only when `oto_init_steps` is not given; when neither is given
            the fraction is `0.5`.
        oto_variant (`str`, *optional*, defaults to `"adamw"`):
            Base direction of HSPG: `"adamw"` (uses `adam_beta1`, `adam_beta2`, `adam_epsilon`) or `"sgd"` (uses
            `oto_momentum`).
        oto_momentum (`float`, *optional*, defaults to `0.9`):
            Momentum in [0, 1) of the `"sgd"` variant.
        oto_max_group_sparsity (`float`, *optional*):
            Upper bound in (0, 1] on the fraction of groups HSPG may zero; no bound when not given.
        oto_channel_penalty (`str`, *optional*, defaults to `"conv_and_norm"`):
            For `"channels"` groups: `"conv_and_norm"` (the paper) or `"norm"` (only the batch-norm weight and bias
            where a norm reads a convolution directly; see [`~hf_oto.build_zigs`]).
        oto_max_family_sparsity (`float`, *optional*):
            Upper bound in (0, 1] on the fraction of each family's groups (one layer's heads, FFN rows or channels)
            HSPG may zero, so that no layer is emptied; no bound when not given.
        oto_families (`list[str]`, *optional*):
            Which kinds of zero-invariant groups to train for sparsity: attention `"heads"` and/or `"ffn"` rows of a
            transformer, or `"channels"` of a convolutional network. By default `["heads", "ffn"]` for supported
            transformers and `["channels"]` for models with convolutions (see [`~hf_oto.build_zigs`]).
        oto_exclude (`list[str]`, *optional*, defaults to `[]`):
            `fnmatch` patterns of group families or parameter names to leave dense, e.g. `"*.layer.0.*"`.

    Example:

    ```python
    >>> from transformers import HfArgumentParser
    >>> from hf_oto.training_args import OTOArguments

    >>> (oto_args,) = HfArgumentParser(OTOArguments).parse_args_into_dataclasses(["--oto_lambda", "0.01"])
    >>> oto_args.hspg_kwargs()["lmbda"], oto_args.resolve_oto_init_steps(max_steps=100)
    (0.01, 50)
    ```
    """

    oto_lambda: float = field(
        default=1e-3,
        metadata={"help": "Weight lambda > 0 of the group-lasso term of OTO; larger gives more zero groups."},
    )
    oto_epsilon: float = field(
        default=0.0,
        metadata={"help": "Aggressiveness epsilon in [0, 1) of the half-space projection (the paper uses 0)."},
    )
    oto_init_steps: Optional[int] = field(
        default=None,
        metadata={
            "help": "Optimizer steps of the HSPG initialization stage before the half-space stage. Wins over "
            "--oto_init_fraction when both are given."
        },
    )
    oto_init_fraction: Optional[float] = field(
        default=None,
        metadata={
            "help": "Initialization stage length as a fraction in [0, 1] of the total optimizer steps, used when "
            f"--oto_init_steps is not given (default {DEFAULT_INIT_FRACTION} when neither is given)."
        },
    )
    oto_variant: str = field(
        default="adamw",
        metadata={"help": "Base direction of HSPG: adamw or sgd.", "choices": list(OTO_VARIANTS)},
    )
    oto_momentum: float = field(
        default=0.9,
        metadata={"help": "Momentum in [0, 1) of the sgd variant of HSPG."},
    )
    oto_max_group_sparsity: Optional[float] = field(
        default=None,
        metadata={"help": "Upper bound in (0, 1] on the fraction of groups HSPG may set to zero; none by default."},
    )
    oto_max_family_sparsity: Optional[float] = field(
        default=None,
        metadata={
            "help": "Upper bound in (0, 1] on the fraction of each family's groups (a layer's heads, FFN rows or "
            "channels) HSPG may set to zero; none by default."
        },
    )
    oto_channel_penalty: str = field(
        default="conv_and_norm",
        metadata={
            "help": "Channel groups of conv networks: conv_and_norm penalises filter, bias and batch-norm weight and "
            "bias (the paper); norm penalises only the batch-norm weight and bias where a norm reads a conv directly.",
            "choices": ["conv_and_norm", "norm"],
        },
    )
    oto_families: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Kinds of zero-invariant groups to train for sparsity: heads and/or ffn (transformers), or "
            "channels (conv networks). Default: heads ffn for transformers, channels for models with convolutions."
        },
    )
    oto_exclude: list[str] = field(
        default_factory=list,
        metadata={"help": "fnmatch patterns of group families or parameter names to keep dense, e.g. '*.layer.0.*'."},
    )

    def __post_init__(self):
        self._validate_oto_arguments()

    def _validate_oto_arguments(self) -> None:
        if not (isinstance(self.oto_lambda, (int, float)) and math.isfinite(self.oto_lambda) and self.oto_lambda > 0):
            raise ValueError(f"oto_lambda must be a finite number > 0; got {self.oto_lambda!r}.")
        if not (isinstance(self.oto_epsilon, (int, float)) and 0.0 <= self.oto_epsilon < 1.0):
            raise ValueError(f"oto_epsilon must be in [0, 1); got {self.oto_epsilon!r}.")
        if self.oto_init_steps is not None and (
            isinstance(self.oto_init_steps, bool)
            or not isinstance(self.oto_init_steps, int)
            or self.oto_init_steps < 0
        ):
            raise ValueError(f"oto_init_steps must be an integer >= 0 (or None); got {self.oto_init_steps!r}.")
        if self.oto_init_fraction is not None and not (
            isinstance(self.oto_init_fraction, (int, float)) and 0.0 <= self.oto_init_fraction <= 1.0
        ):
            raise ValueError(f"oto_init_fraction must be in [0, 1] (or None); got {self.oto_init_fraction!r}.")
        if self.oto_init_steps is not None and self.oto_init_fraction is not None:
            logger.warning(
                f"Both oto_init_steps={self.oto_init_steps} and oto_init_fraction={self.oto_init_fraction} are set; "
                "oto_init_steps wins."
            )
        if self.oto_variant not in OTO_VARIANTS:
            raise ValueError(f"oto_variant must be one of {list(OTO_VARIANTS)}; got {self.oto_variant!r}.")
        if not (isinstance(self.oto_momentum, (int, float)) and 0.0 <= self.oto_momentum < 1.0):
            raise ValueError(f"oto_momentum must be in [0, 1); got {self.oto_momentum!r}.")
        if self.oto_max_group_sparsity is not None and not (
            isinstance(self.oto_max_group_sparsity, (int, float)) and 0.0 < self.oto_max_group_sparsity <= 1.0
        ):
            raise ValueError(
                f"oto_max_group_sparsity must be in (0, 1] (or None for no bound); got {self.oto_max_group_sparsity!r}."
            )
        if self.oto_max_family_sparsity is not None and not (
            isinstance(self.oto_max_family_sparsity, (int, float)) and 0.0 < self.oto_max_family_sparsity <= 1.0
        ):
            raise ValueError(
                "oto_max_family_sparsity must be in (0, 1] (or None for no bound); got "
                f"{self.oto_max_family_sparsity!r}."
            )
        if self.oto_channel_penalty not in ("conv_and_norm", "norm"):
            raise ValueError(
                f"oto_channel_penalty must be 'conv_and_norm' or 'norm'; got {self.oto_channel_penalty!r}."
            )
        if isinstance(self.oto_families, str):
            self.oto_families = [self.oto_families]
        if self.oto_families is not None:
            self.oto_families = list(self.oto_families)
            unknown = [family for family in self.oto_families if family not in OTO_FAMILIES]
            if unknown or not self.oto_families:
                raise ValueError(
                    f"oto_families must be a non-empty list drawn from {list(OTO_FAMILIES)} (or unset for the model's "
                    f"default); got {self.oto_families!r}."
                )
            if len(set(self.oto_families)) != len(self.oto_families):
                raise ValueError(f"oto_families lists a family twice: {self.oto_families!r}.")
        if isinstance(self.oto_exclude, str):
            self.oto_exclude = [self.oto_exclude]
        self.oto_exclude = list(self.oto_exclude)
        bad = [pattern for pattern in self.oto_exclude if not isinstance(pattern, str) or not pattern]
        if bad:
            raise ValueError(f"oto_exclude must hold non-empty fnmatch patterns (strings); got {bad!r}.")

    def resolve_oto_init_steps(self, max_steps: int) -> int:
        """Number of initialization-stage steps of a run of `max_steps` optimizer steps.

        `oto_init_steps` wins when set; otherwise `floor(oto_init_fraction * max_steps)`, with the fraction
        defaulting to `0.5`.

        Args:
            max_steps (`int`): Total number of optimizer steps of the run.

        Returns:
            `int`: the number of steps HSPG spends in its initialization stage.
        """
        if self.oto_init_steps is not None:
            if max_steps > 0 and self.oto_init_steps >= max_steps:
                logger.warning(
                    f"oto_init_steps={self.oto_init_steps} >= the {max_steps} training steps: the half-space stage "
                    "never starts and no group will be zeroed by projection."
                )
            return self.oto_init_steps
        fraction = DEFAULT_INIT_FRACTION if self.oto_init_fraction is None else self.oto_init_fraction
        return int(math.floor(fraction * max_steps))

    def zig_kwargs(self) -> dict:
        """The keyword arguments of [`build_zigs`] these knobs set: `families`, `exclude` and `channel_penalty`."""
        return {
            "families": self.oto_families,
            "exclude": self.oto_exclude,
            "channel_penalty": self.oto_channel_penalty,
        }

    def hspg_kwargs(self) -> dict:
        """The keyword arguments of [`HSPG`] these knobs set: `lmbda`, `epsilon`, `variant`, `momentum`,
        `max_group_sparsity` and `max_family_sparsity` (the learning rate, `init_steps` and the Adam settings come from
        the training loop)."""
        return {
            "lmbda": self.oto_lambda,
            "epsilon": self.oto_epsilon,
            "variant": self.oto_variant,
            "momentum": self.oto_momentum,
            "max_group_sparsity": self.oto_max_group_sparsity,
            "max_family_sparsity": self.oto_max_family_sparsity,
        }

    def oto_hyperparameters(self) -> dict:
        """The OTO knobs as a JSON-ready dict (for model cards and logs)."""
        return {
            "oto_lambda": self.oto_lambda,
            "oto_epsilon": self.oto_epsilon,
            "oto_init_steps": self.oto_init_steps,
            "oto_init_fraction": self.oto_init_fraction,
            "oto_variant": self.oto_variant,
            "oto_momentum": self.oto_momentum,
            "oto_max_group_sparsity": self.oto_max_group_sparsity,
            "oto_max_family_sparsity": self.oto_max_family_sparsity,
            "oto_families": list(self.oto_families) if self.oto_families is not None else None,
            "oto_channel_penalty": self.oto_channel_penalty,
            "oto_exclude": list(self.oto_exclude),
        }


@dataclass
class OTOTrainingArguments(OTOArguments, TrainingArguments):
    r"""
    [`~transformers.TrainingArguments`] for [`OTOTrainer`]: the usual arguments (learning rate, schedule and warm-up,
    weight decay, Adam betas and epsilon, gradient accumulation, max grad norm, ...) plus the knobs of Only Train
    Once. The HSPG optimizer replaces the one `optim` would choose. `fsdp` and `deepspeed` are refused with a
    `ValueError` (see `hf_oto.distributed`); multi-process data parallel (`torchrun`, `accelerate launch`) works.

    The `oto_*` parameters are those of [`OTOArguments`].

    Example:

    ```python
    >>> from transformers import HfArgumentParser
    >>> from hf_oto import OTOTrainingArguments

    >>> parser = HfArgumentParser(OTOTrainingArguments)
    >>> (args,) = parser.parse_args_into_dataclasses(
    ...     ["--output_dir", "out", "--oto_lambda", "0.01", "--oto_init_fraction", "0.25", "--oto_families", "heads"]
    ... )
    >>> args.oto_lambda, args.oto_families
    (0.01, ['heads'])
    >>> args.resolve_oto_init_steps(max_steps=1000)
    250
    ```
    """

    def __post_init__(self):
        self._validate_oto_arguments()
        # Before the Trainer's own set-up (which would import DeepSpeed or build an FSDP plugin).
        if self.deepspeed:
            check_distributed_support("DEEPSPEED")
        if self.fsdp:
            check_distributed_support("FSDP")
        TrainingArguments.__post_init__(self)
