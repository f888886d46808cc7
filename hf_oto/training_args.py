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
OTO_MODES = ("target", "paper")
DEFAULT_INIT_FRACTION = {"target": 0.2, "paper": 0.5}
"""Per mode, the fraction of the training steps before the first zero group (the paper mode's initialization stage,
the target mode's first selection) when neither `oto_init_steps` nor `oto_init_fraction` is given."""
DEFAULT_LAMBDA = 1e-3
"""The paper mode's group-lasso weight when `oto_lambda` is not given."""


@dataclass
class OTOArguments:
    r"""
    The knobs of Only Train Once, on their own: the HSPG hyper-parameters and which zero-invariant groups to train.
    [`OTOTrainingArguments`] adds them to the `Trainer`'s arguments; a training loop of your own (e.g.
    `scripts/run_text_classification_oto_no_trainer.py` with Accelerate) parses them next to its other arguments with
    `HfArgumentParser` and builds HSPG with [`OTOArguments.hspg_kwargs`].

    Parameters:
        oto_mode (`str`, *optional*, defaults to `"target"`):
            `"target"`: prune to a stated FLOPs/parameter target, choosing the groups by their loss saliency per unit
            of cost and ramping each selected group to exactly zero (see [`~hf_oto.optim.HSPG`]). `"paper"`: the
            paper's HSPG (group-lasso weight `oto_lambda`, half-space projection, optional sparsity bounds).
        oto_target_flops (`float`, *optional*):
            Target mode: fraction in (0, 1] of the dense model's FLOPs (at `oto_cost_seq_length` tokens) to keep.
            When neither this nor `oto_target_params` is given: `0.5`.
        oto_target_params (`float`, *optional*):
            Target mode: fraction in (0, 1] of the dense model's parameters to keep.
        oto_max_kind_sparsity (`str`, *optional*):
            Target mode: per-kind caps on the fraction of groups removed, `kind=fraction` comma-separated, e.g.
            `"heads=0.75"`.
        oto_min_kept_per_family (`int`, *optional*, defaults to 1):
            Target mode: groups each family (a layer's heads, FFN rows or channels) keeps at least; 0 lets a layer be
            emptied.
        oto_pruning_fraction (`float`, *optional*, defaults to `0.3`):
            Target mode: length of the pruning window (selections and ramps), as a fraction of the training steps,
            starting after the first `oto_init_fraction` of them. The rest of the run trains the slim architecture.
        oto_pruning_periods (`int`, *optional*, defaults to 8):
            Target mode: number of selections (re-scorings) in the pruning window. 8 beat 4 on all three seeds of
            the demo benchmark at 50% FLOPs, not at 68% (`benchmarks/README.md`).
        oto_cost_seq_length (`int`, *optional*, defaults to 128):
            Target mode: the sequence length at which FLOPs are counted for the target (and the report).
        oto_lambda (`float`, *optional*):
            Paper mode: weight λ > 0 of the group-lasso term (default `1e-3`); a larger λ gives more zero groups and a
            larger bias. Refused in the target mode, which has no uniform penalty.
        oto_epsilon (`float`, *optional*, defaults to `0.0`):
            Paper mode: aggressiveness ε ∈ [0, 1) of the half-space projection; the paper keeps it at 0.
        oto_init_steps (`int`, *optional*):
            Number of optimizer steps before any group may be zeroed: the paper mode's initialization stage (plain
            (sub)gradient steps), the target mode's first selection. When given, it wins over `oto_init_fraction`.
        oto_init_fraction (`float`, *optional*):
            The same as a fraction in [0, 1] of the total number of optimizer steps (known once training starts;
            rounded down). Used only when `oto_init_steps` is not given; when neither is given the fraction is `0.2`
            in the target mode and `0.5` in the paper mode.
        oto_variant (`str`, *optional*, defaults to `"adamw"`):
            Base direction of HSPG: `"adamw"` (uses `adam_beta1`, `adam_beta2`, `adam_epsilon`), `"sgd"` (uses
            `oto_momentum`), or the name of a direction registered with
            [`~hf_oto.optim.directions.register_direction`] (also on the command line, once the module that
            registers it is imported).
        oto_momentum (`float`, *optional*, defaults to `0.9`):
            Momentum in [0, 1) of the `"sgd"` variant.
        oto_max_group_sparsity (`float`, *optional*):
            Paper mode: upper bound in (0, 1] on the fraction of groups HSPG may zero; no bound when not given.
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

    >>> (oto_args,) = HfArgumentParser(OTOArguments).parse_args_into_dataclasses(["--oto_target_flops", "0.4"])
    >>> oto_args.hspg_kwargs(max_steps=100)["target"].flops, oto_args.resolve_oto_init_steps(max_steps=100)
    (0.4, 20)
    ```
    """

    oto_mode: str = field(
        default="target",
        metadata={
            "help": "target: prune to --oto_target_flops/--oto_target_params, choosing groups by loss saliency per "
            "unit of cost; paper: the paper's HSPG with --oto_lambda.",
            "choices": list(OTO_MODES),
        },
    )
    oto_target_flops: Optional[float] = field(
        default=None,
        metadata={
            "help": "Target mode: fraction in (0, 1] of the dense model's FLOPs to keep (default 0.5 when no target "
            "is given)."
        },
    )
    oto_target_params: Optional[float] = field(
        default=None,
        metadata={"help": "Target mode: fraction in (0, 1] of the dense model's parameters to keep."},
    )
    oto_max_kind_sparsity: Optional[str] = field(
        default=None,
        metadata={"help": "Target mode: caps per kind of group, e.g. 'heads=0.75' (at most 75%% of heads removed)."},
    )
    oto_min_kept_per_family: int = field(
        default=1,
        metadata={"help": "Target mode: groups every layer's family keeps at least (0 allows emptying a layer)."},
    )
    oto_pruning_fraction: float = field(
        default=0.3,
        metadata={"help": "Target mode: length of the pruning window as a fraction of the training steps."},
    )
    oto_pruning_periods: int = field(
        default=8,
        metadata={"help": "Target mode: number of selections (re-scorings) in the pruning window."},
    )
    oto_cost_seq_length: int = field(
        default=128,
        metadata={"help": "Target mode: sequence length at which FLOPs are counted for the target."},
    )
    oto_lambda: Optional[float] = field(
        default=None,
        metadata={
            "help": f"Paper mode: weight lambda > 0 of the group-lasso term (default {DEFAULT_LAMBDA}); larger gives "
            "more zero groups."
        },
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
        metadata={
            "help": "Base direction of HSPG: adamw or sgd, or the name of a direction registered with "
            "hf_oto.optim.directions.register_direction."
        },
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
        if self.oto_mode not in OTO_MODES:
            raise ValueError(f"oto_mode must be one of {list(OTO_MODES)}; got {self.oto_mode!r}.")
        if self.oto_mode == "target":
            paper_only = {
                "oto_lambda": self.oto_lambda,
                "oto_max_group_sparsity": self.oto_max_group_sparsity,
            }
            given = [name for name, value in paper_only.items() if value is not None]
            if given:
                raise ValueError(
                    f"{', '.join(given)} belong(s) to the paper mode (uniform group-lasso penalty, bound on the number "
                    "of zero groups), but oto_mode is 'target', which prunes to a cost target: state it with "
                    "oto_target_flops / oto_target_params, or pass oto_mode='paper' (`--oto_mode paper`) to run the "
                    "paper's HSPG."
                )
            # Builds (and so validates) the target now rather than when training starts.
            self.oto_pruning_target()
            for name in ("oto_pruning_periods", "oto_cost_seq_length"):
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"{name} must be an integer >= 1; got {value!r}.")
            if not (isinstance(self.oto_pruning_fraction, (int, float)) and 0.0 < self.oto_pruning_fraction <= 1.0):
                raise ValueError(f"oto_pruning_fraction must be in (0, 1]; got {self.oto_pruning_fraction!r}.")
        else:
            target_only = {
                "oto_target_flops": self.oto_target_flops,
                "oto_target_params": self.oto_target_params,
                "oto_max_kind_sparsity": self.oto_max_kind_sparsity,
            }
            given = [name for name, value in target_only.items() if value is not None]
            if given:
                raise ValueError(
                    f"{', '.join(given)} belong(s) to the target mode; oto_mode is 'paper'. Drop them, or pass "
                    "oto_mode='target'."
                )
            if self.oto_lambda is None:
                self.oto_lambda = DEFAULT_LAMBDA
        if self.oto_lambda is not None and not (
            isinstance(self.oto_lambda, (int, float)) and math.isfinite(self.oto_lambda) and self.oto_lambda > 0
        ):
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
        from .optim.directions import DIRECTIONS  # built-ins and any direction registered with @register_direction

        if self.oto_variant not in DIRECTIONS:
            raise ValueError(
                f"oto_variant must be one of {sorted(DIRECTIONS)}; got {self.oto_variant!r}. (A base direction of your "
                "own is registered with `hf_oto.optim.directions.register_direction`.)"
            )
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

    def oto_pruning_target(self):
        """Target mode: the [`~hf_oto.optim.PruningTarget`] these knobs state (`None` in the paper mode)."""
        from .optim.target import PruningTarget, parse_kind_caps

        if self.oto_mode != "target":
            return None
        return PruningTarget(
            flops=self.oto_target_flops,
            params=self.oto_target_params,
            max_kind_sparsity=parse_kind_caps(self.oto_max_kind_sparsity),
            min_kept_per_family=self.oto_min_kept_per_family,
        )

    def resolve_oto_pruning_schedule(self, max_steps: int) -> dict:
        """Target mode: `{"pruning_steps", "pruning_periods"}` of a run of `max_steps` optimizer steps (fewer periods
        when the window is shorter than `oto_pruning_periods` steps); `{}` in the paper mode."""
        if self.oto_mode != "target":
            return {}
        init_steps = self.resolve_oto_init_steps(max_steps)
        steps = max(1, int(math.floor(self.oto_pruning_fraction * max_steps)))
        if max_steps > 0 and init_steps + steps > max_steps:
            logger.warning(
                f"The pruning window (steps {init_steps} to {init_steps + steps}) runs past the {max_steps} training "
                "steps: the last groups selected will not reach zero in training and stay in the model. Lower "
                "oto_init_fraction / oto_pruning_fraction."
            )
        return {"pruning_steps": steps, "pruning_periods": min(self.oto_pruning_periods, steps)}

    def resolve_oto_init_steps(self, max_steps: int) -> int:
        """Number of initialization-stage steps of a run of `max_steps` optimizer steps.

        `oto_init_steps` wins when set; otherwise `floor(oto_init_fraction * max_steps)`, with the fraction
        defaulting to `0.2` in the target mode and `0.5` in the paper mode.

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
        fraction = DEFAULT_INIT_FRACTION[self.oto_mode] if self.oto_init_fraction is None else self.oto_init_fraction
        return int(math.floor(fraction * max_steps))

    def zig_kwargs(self) -> dict:
        """The keyword arguments of [`build_zigs`] these knobs set: `families`, `exclude` and `channel_penalty`."""
        return {
            "families": self.oto_families,
            "exclude": self.oto_exclude,
            "channel_penalty": self.oto_channel_penalty,
        }

    def hspg_kwargs(self, max_steps: int | None = None) -> dict:
        """The keyword arguments of [`HSPG`] these knobs set: `mode`, `lmbda`, `epsilon`, `variant`, `momentum`,
        `max_group_sparsity` and `max_family_sparsity`, and in the target mode `target`, `cost_seq_length` and, given
        the run's `max_steps`, `pruning_steps` and `pruning_periods` (the learning rate, `init_steps` and the Adam
        settings come from the training loop)."""
        if self.oto_mode == "target":
            if max_steps is None:
                raise ValueError("The target mode's schedule needs the run's length: call hspg_kwargs(max_steps=...).")
            if self.oto_target_flops is None and self.oto_target_params is None:
                logger.warning(
                    f"OTO target mode without a stated target: pruning to the default, {self.oto_pruning_target().flops:.0%}"
                    f" of the dense model's FLOPs at {self.oto_cost_seq_length} tokens. Set --oto_target_flops / "
                    "--oto_target_params to choose."
                )
            return {
                "mode": "target",
                "target": self.oto_pruning_target(),
                "cost_seq_length": self.oto_cost_seq_length,
                **self.resolve_oto_pruning_schedule(max_steps),
                "variant": self.oto_variant,
                "momentum": self.oto_momentum,
                "max_family_sparsity": self.oto_max_family_sparsity,
            }
        return {
            "mode": "paper",
            "lmbda": self.oto_lambda,
            "epsilon": self.oto_epsilon,
            "variant": self.oto_variant,
            "momentum": self.oto_momentum,
            "max_group_sparsity": self.oto_max_group_sparsity,
            "max_family_sparsity": self.oto_max_family_sparsity,
        }

    def oto_hyperparameters(self) -> dict:
        """The OTO knobs as a JSON-ready dict (for model cards and logs)."""
        if self.oto_mode == "target":
            return {
                "oto_mode": self.oto_mode,
                "oto_target_flops": self.oto_pruning_target().flops,
                "oto_target_stated": self.oto_target_flops is not None or self.oto_target_params is not None,
                "oto_target_params": self.oto_target_params,
                "oto_max_kind_sparsity": self.oto_max_kind_sparsity,
                "oto_min_kept_per_family": self.oto_min_kept_per_family,
                "oto_pruning_fraction": self.oto_pruning_fraction,
                "oto_pruning_periods": self.oto_pruning_periods,
                "oto_cost_seq_length": self.oto_cost_seq_length,
                "oto_init_steps": self.oto_init_steps,
                "oto_init_fraction": self.oto_init_fraction,
                "oto_variant": self.oto_variant,
                "oto_max_family_sparsity": self.oto_max_family_sparsity,
                "oto_families": list(self.oto_families) if self.oto_families is not None else None,
                "oto_channel_penalty": self.oto_channel_penalty,
                "oto_exclude": list(self.oto_exclude),
            }
        return {
            "oto_mode": self.oto_mode,
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

    The `oto_*` parameters are those of [`OTOArguments`], plus:

        oto_push_checkpoints (`bool`, *optional*, defaults to `False`):
            With `push_to_hub=True`, the `Trainer` pushes the full-size model at every save during training. OTO's
            product is the slim model, so by default [`OTOTrainer`] pushes nothing during training and
            `trainer.push_to_hub()` uploads the slim folder once, after `trainer.prune()`. Set this to push the
            dense checkpoints as well, with the `Trainer`'s own `hub_strategy` semantics.

    Example:

    ```python
    >>> from transformers import HfArgumentParser
    >>> from hf_oto import OTOTrainingArguments

    >>> parser = HfArgumentParser(OTOTrainingArguments)
    >>> (args,) = parser.parse_args_into_dataclasses(
    ...     ["--output_dir", "out", "--oto_target_flops", "0.4", "--oto_init_fraction", "0.25", "--oto_families", "heads"]
    ... )
    >>> args.oto_mode, args.oto_target_flops, args.oto_families
    ('target', 0.4, ['heads'])
    >>> args.resolve_oto_init_steps(max_steps=1000)
    250
    ```
    """

    oto_push_checkpoints: bool = field(
        default=False,
        metadata={
            "help": "With --push_to_hub, also push the full-size (dense, group-sparse) model during training, at each "
            "save, as the Trainer does (with its hub_strategy). Default: only the slim model is pushed, once, by "
            "`push_to_hub()` after pruning."
        },
    )

    if not hasattr(TrainingArguments, "overwrite_output_dir"):  # removed in transformers 5
        overwrite_output_dir: bool = field(
            default=False,
            metadata={
                "help": "Train in an output folder that holds other files or another run's checkpoints (see "
                "hf_oto.output_dir)."
            },
        )

    def __post_init__(self):
        self._validate_oto_arguments()
        # Before the Trainer's own set-up (which would import DeepSpeed or build an FSDP plugin).
        if self.deepspeed:
            check_distributed_support("DEEPSPEED")
        if self.fsdp:
            check_distributed_support("FSDP")
        TrainingArguments.__post_init__(self)
