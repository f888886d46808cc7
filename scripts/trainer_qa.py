"""An [`OTOTrainer`] for extractive question answering, as `trainer_qa.py` in transformers'
`examples/pytorch/question-answering`: its `evaluate` runs the Trainer's prediction loop, turns the start/end logits of
the windows into the answer of each example (n-best search), writes them to `<output_dir>/eval_predictions.json` and
computes the SQuAD v1.1 exact match / F1, which it logs through the Trainer's `log`: they reach `log_history`, the
callbacks (TensorBoard, W&B, ...) and the model card of the slim model.

A sibling of `run_squad_oto.py`, imported as `import trainer_qa` (the script's folder is on `sys.path`).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers.trainer_utils import speed_metrics
from transformers.utils import logging

from hf_oto import OTOTrainer
from utils_qa import postprocess_qa_predictions, squad_metrics


logger = logging.get_logger("hf_oto.trainer_qa")

POSTPROCESSING_COLUMNS = ("example_id", "offset_mapping")
"""Columns of the evaluation features that only the post-processing reads (the model does not take them)."""


class QuestionAnsweringOTOTrainer(OTOTrainer):
    """[`OTOTrainer`] whose `evaluate` scores answers, not windows: exact match and F1 of SQuAD v1.1 on the examples
    the evaluation features come from.

    Args:
        eval_examples (`Dataset`, *optional*): The raw evaluation examples (`id`, `context`, `answers`) that
            `eval_dataset` was built from with `utils_qa.prepare_eval_features`.
        n_best_size (`int`, *optional*, defaults to 20): Start and end candidates combined per window.
        max_answer_length (`int`, *optional*, defaults to 30): Longest answer, in tokens.
        args, kwargs: Those of [`OTOTrainer`].

    Example:

    ```python
    >>> trainer = QuestionAnsweringOTOTrainer(
    ...     model=model, args=training_args, train_dataset=train_features, eval_dataset=eval_features,
    ...     eval_examples=eval_examples, data_collator=default_data_collator, processing_class=tokenizer,
    ... )
    >>> trainer.train()
    >>> slim = trainer.prune()
    >>> metrics = trainer.evaluate()  # the slim model; also in trainer.state.log_history
    >>> sorted(key for key in metrics if key in ("eval_exact_match", "eval_f1"))
    ['eval_exact_match', 'eval_f1']
    ```
    """

    def __init__(
        self,
        *args: Any,
        eval_examples: Dataset | None = None,
        n_best_size: int = 20,
        max_answer_length: int = 30,
        **kwargs: Any,
    ):
        for name, value in (("n_best_size", n_best_size), ("max_answer_length", max_answer_length)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer; got {value!r}.")
        super().__init__(*args, **kwargs)
        self.eval_examples = eval_examples
        self.n_best_size = n_best_size
        self.max_answer_length = max_answer_length

    def evaluate(
        self,
        eval_dataset: Dataset | None = None,
        eval_examples: Dataset | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """Predicts the answer of every example, writes the answers to `<output_dir>/<prefix>_predictions.json` (main
        process) and returns (and logs) `<prefix>_exact_match` and `<prefix>_f1` (in percent) with the speed
        metrics of the prediction loop.

        Args:
            eval_dataset (`Dataset`, *optional*): Features from `utils_qa.prepare_eval_features` (with `example_id`
                and `offset_mapping`); defaults to the trainer's `eval_dataset`.
            eval_examples (`Dataset`, *optional*): The examples they come from; defaults to the trainer's
                `eval_examples`.
            ignore_keys (`list[str]`, *optional*): Keys of the model outputs to ignore.
            metric_key_prefix (`str`, *optional*, defaults to `"eval"`): Prefix of the metric names.

        Returns:
            `dict[str, float]`: the metrics.
        """
        eval_dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        eval_examples = self.eval_examples if eval_examples is None else eval_examples
        if eval_dataset is None or eval_examples is None:
            raise ValueError(
                "QuestionAnsweringOTOTrainer.evaluate needs the evaluation features and the examples they come from: "
                "pass eval_dataset= (from utils_qa.prepare_eval_features) and eval_examples=, here or to the trainer."
            )
        columns = getattr(eval_dataset, "column_names", None)
        if columns is None or any(column not in columns for column in POSTPROCESSING_COLUMNS):
            raise ValueError(
                f"The evaluation features must be a `datasets.Dataset` with the columns {list(POSTPROCESSING_COLUMNS)}"
                f" (build them with utils_qa.prepare_eval_features); got the columns {columns}."
            )
        # The model takes neither column, whatever --remove_unused_columns says.
        dataloader = self.get_eval_dataloader(eval_dataset.remove_columns(list(POSTPROCESSING_COLUMNS)))
        start_time = time.time()
        output = self.evaluation_loop(
            dataloader,
            description="Evaluation",
            prediction_loss_only=False,  # the logits are post-processed below
            ignore_keys=ignore_keys,
            metric_key_prefix=metric_key_prefix,
        )
        for key in ("jit_compilation_time", "model_preparation_time"):
            start_time += output.metrics.get(f"{metric_key_prefix}_{key}", 0.0)
        total_batch_size = self.args.eval_batch_size * self.args.world_size
        output.metrics.update(
            speed_metrics(
                metric_key_prefix,
                start_time,
                num_samples=output.num_samples,
                num_steps=math.ceil(output.num_samples / total_batch_size),
            )
        )

        start_logits, end_logits = output.predictions[:2]
        logger.info(f"Post-processing the predictions of {len(eval_examples)} examples ({len(eval_dataset)} windows).")
        predictions = postprocess_qa_predictions(
            eval_examples,
            eval_dataset,
            start_logits,
            end_logits,
            n_best_size=self.n_best_size,
            max_answer_length=self.max_answer_length,
        )
        if self.args.should_save:
            Path(self.args.output_dir).mkdir(parents=True, exist_ok=True)
            with open(os.path.join(self.args.output_dir, f"{metric_key_prefix}_predictions.json"), "w") as handle:
                json.dump(predictions, handle, indent=2)
        metrics = {
            f"{metric_key_prefix}_{key}": value for key, value in squad_metrics(predictions, eval_examples).items()
        }
        metrics.update(output.metrics)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
