"""The argument dataclasses that several example scripts share (the others live in their script, as in transformers'
`examples/`). A sibling of the scripts, imported as `from oto_example_args import ModelArguments` (a script's folder is
on `sys.path` when it runs as `python scripts/<script>.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelArguments:
    """Which pretrained model (and tokenizer) a script fine-tunes, prunes and saves.

    Example:

    ```python
    >>> from transformers import HfArgumentParser
    >>> (model_args,) = HfArgumentParser(ModelArguments).parse_args_into_dataclasses(
    ...     ["--model_name_or_path", "bert-base-uncased"]
    ... )
    >>> model_args.tokenizer_name or model_args.model_name_or_path
    'bert-base-uncased'
    ```
    """

    model_name_or_path: str = field(metadata={"help": "Path to a pretrained model folder or a Hub model id."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads and datasets are stored."})
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Load a checkpoint whose task head has another number of labels (re-initialised)."},
    )
