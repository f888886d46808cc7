"""Model cards of pruned checkpoints: Hub metadata, size before → after, the per-layer layout as a table and a plot.

The card is rendered by `huggingface_hub.ModelCard.from_template` from `hf_oto/templates/model_card.md` (also at
`model_cards/template.md`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from transformers.utils import logging

from .group_kinds import kinds_in
from .hub import LOCAL_REPO_PLACEHOLDER
from .report import PruningReport


logger = logging.get_logger(__name__)

TEMPLATE_PATH = Path(__file__).parent / "templates" / "model_card.md"
PLOT_FILE = "oto_layout.png"
DEFAULT_TAGS = ("hf_oto", "oto", "pruning", "structured-pruning", "only-train-once")
LIBRARY_NAME = "hf_oto"
"""The card's `library_name`: the model loads with `hf_oto.load_pruned_model`, not with plain `from_pretrained`, so
the card must not claim `transformers` (the Hub would offer a `from_pretrained` snippet that fails)."""

PIPELINE_TAGS = {
    "AutoModelForSequenceClassification": "text-classification",
    "AutoModelForQuestionAnswering": "question-answering",
    "AutoModelForImageClassification": "image-classification",
    "AutoModelForTokenClassification": "token-classification",
    "AutoModelForCausalLM": "text-generation",
    "AutoModelForMaskedLM": "fill-mask",
    "AutoModel": "feature-extraction",
}
"""The Hub `pipeline_tag` (and `transformers.pipeline` task) of each auto class."""

IMAGE_TASKS = ("image-classification",)
NOT_A_METRIC = ("loss", "runtime", "per_second", "samples", "epoch", "steps")
"""Suffixes of evaluation figures that do not go into the card's `model-index`."""


def card_title(
    model_name: str | None = None,
    repo_id: str | None = None,
    base_model: str | None = None,
    pipeline_tag: str | None = None,
) -> str:
    """The card's title: `model_name` if given, else the repository name, else the base model and the task (never
    the name of a local folder such as `pruned`).

    Example:

    ```python
    >>> card_title(repo_id="me/bert-sst2-oto")
    'bert-sst2-oto'
    >>> card_title(base_model="bert-base-uncased", pipeline_tag="text-classification")
    'bert-base-uncased pruned with OTO for text classification'
    ```
    """
    if model_name:
        return model_name
    if repo_id and repo_id != LOCAL_REPO_PLACEHOLDER:
        return repo_id.rstrip("/").split("/")[-1]
    base = base_model.rstrip("/").split("/")[-1] if base_model else "Model"
    task = f" for {pipeline_tag.replace('-', ' ')}" if pipeline_tag else ""
    return f"{base} pruned with OTO{task}"


def eval_results(
    metrics: Mapping[str, float] | None,
    *,
    task_type: str | None,
    dataset_type: str | None = None,
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    dataset_split: str | None = None,
) -> list[EvalResult] | None:
    """The card's `model-index` entries: one `huggingface_hub.EvalResult` per evaluation metric (the `eval_` prefix
    dropped; loss, runtime, sample counts left out). `None` without metrics or task.

    Example:

    ```python
    >>> [r.metric_type for r in eval_results({"eval_accuracy": 0.9, "eval_loss": 0.3}, task_type="text-classification")]
    ['accuracy']
    ```
    """
    if not metrics or not task_type:
        return None
    results = []
    for key, value in metrics.items():
        name = key.removeprefix("eval_")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or name.endswith(NOT_A_METRIC):
            continue
        results.append(
            EvalResult(
                task_type=task_type,
                dataset_type=dataset_type or "custom",
                dataset_name=dataset_name or dataset_type or "custom data",
                dataset_config=dataset_config,
                dataset_split=dataset_split,
                metric_type=name,
                metric_value=float(value),
            )
        )
    return results or None


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _ratio(after: int, before: int) -> str:
    return f"{after / before:.1%}" if before else "-"


def layout_table(report: PruningReport) -> str:
    """Markdown table of what every row keeps: per layer the kept heads (and KV heads) and FFN rows of a
    transformer, per channel family the kept channels of a convolutional network (laid out by the group kinds, see
    [`~hf_oto.group_kinds`])."""
    _, columns = report.columns()
    if not columns:
        return ""
    first = columns[0][0]
    header = [first.row_header] + [kind.table_header(title) for kind, title, _ in columns]
    rows = [
        [first.row_label(row)] + [f"{values[row][1]} / {values[row][0]}" for _, _, values in columns]
        for row in columns[0][2]
    ]
    return _markdown_table(header, rows)


def plot_layout(report: PruningReport, path: str | os.PathLike) -> Path:
    """Draws the kept share of every group kind per row (layer, or channel family) as a bar chart (PNG) and returns
    its path.

    Example:

    ```python
    >>> plot_layout(report, "slim-model/oto_layout.png")
    PosixPath('slim-model/oto_layout.png')
    ```
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axis_name, columns = report.columns()
    kinds = kinds_in(report.layout_before)
    # One bar series per kind: its first column (heads, FFN rows, channels; not the KV heads)
    firsts = []
    for column in columns:
        if all(column[0] is not first[0] for first in firsts):
            firsts.append(column)
    rows = list(firsts[0][2]) if firsts else []
    positions = list(range(len(rows)))
    per_layer = axis_name == "layer"
    width = 0.8 / max(len(firsts), 1)
    figure, axis = plt.subplots(figsize=(max(5, (0.6 if per_layer else 0.35) * len(rows) + 2), 3.2), dpi=120)
    for index, (kind, _, values) in enumerate(firsts):
        offset = (index - (len(firsts) - 1) / 2) * width
        shares = [values[row][1] / values[row][0] if values[row][0] else 0 for row in rows]
        bars = axis.bar(
            [x + offset for x in positions],
            shares,
            width,
            label=kind.card_label if per_layer else None,
            color=kind.color,
        )
        _label_bars(axis, bars, [values[row][1] for row in rows], fontsize=7 if per_layer else 6)
    axis.set_xticks(positions)
    axis.set_xlabel("layer" if per_layer else "channel family (graph order)")
    axis.set_ylabel("kept share")
    axis.set_ylim(0, 1.4 if per_layer else 1.2)
    title = "Kept per layer" if per_layer else f"Kept {' and '.join(kind.label for kind in kinds)}"
    axis.set_title(
        f"{title}\nparams {report.params_ratio:.0%}, FLOPs {report.flops_ratio:.0%} of the dense model",
        fontsize=9,
    )
    if per_layer:
        axis.legend(loc="upper center", fontsize=8, ncols=max(len(firsts), 1))
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def _label_bars(axis, bars, counts: Sequence[int], fontsize: int) -> None:
    """Writes each bar's kept count above it."""
    for bar, kept in zip(bars, counts):
        axis.annotate(
            str(kept),
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=fontsize,
        )


def create_model_card(
    report: PruningReport,
    *,
    model_name: str | None = None,
    repo_id: str | None = None,
    base_model: str | None = None,
    datasets: Sequence[str] | None = None,
    license: str | None = None,
    language: str | Sequence[str] | None = None,
    pipeline_tag: str | None = None,
    auto_class: str = "AutoModel",
    hyperparameters: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    speedup: Mapping[str, Any] | None = None,
    has_onnx: bool = False,
    tags: Sequence[str] = (),
    training_data: str | None = None,
    eval_dataset_name: str | None = None,
    eval_dataset_config: str | None = None,
    eval_dataset_split: str | None = None,
) -> ModelCard:
    """Renders the model card of a pruned model.

    Args:
        report ([`PruningReport`]): What pruning removed (sizes before/after and per-layer layout).
        model_name (`str`, *optional*): Title of the card (default: see [`card_title`]).
        repo_id (`str`, *optional*): Hub repository shown in the loading lines (default: a placeholder that
            [`hf_oto.hub.push_pruned_model`] replaces with the repository it pushes to).
        base_model (`str`, *optional*): The model OTO started from (Hub id), for the metadata.
        datasets (`Sequence[str]`, *optional*): Training datasets (Hub ids or names).
        license (`str`, *optional*): License identifier, e.g. `"apache-2.0"`.
        language (`str`, *optional*): Hub metadata.
        pipeline_tag (`str`, *optional*): The Hub task, also the `transformers.pipeline` task of the loading lines
            (default: from `auto_class`, e.g. `"text-classification"`).
        auto_class (`str`): The transformers class to pass to `load_pruned_model`, e.g.
            `"AutoModelForSequenceClassification"`.
        hyperparameters (`Mapping[str, Any]`, *optional*): OTO hyper-parameters (λ, ε, stages, ...).
        metrics (`Mapping[str, float]`, *optional*): Evaluation results, e.g. `{"accuracy": 0.91}`.
        speedup (`Mapping[str, Any]`, *optional*): A measured ONNX Runtime speedup: `to_dict()` of a benchmark.
        has_onnx (`bool`): Whether the folder has an `onnx/` export.
        tags (`Sequence[str]`): Extra Hub tags; `pruning`, `oto`, ... are always added.
        training_data (`str`, *optional*): A sentence or two on the training data (for data without a Hub id).
        eval_dataset_name, eval_dataset_config, eval_dataset_split (`str`, *optional*): The evaluation data, for the
            `model-index` (its type is the first of `datasets`, else `custom`).

    Example:

    ```python
    >>> card = create_model_card(report, base_model="bert-base-uncased", datasets=["squad"], license="apache-2.0")
    >>> card.data.tags[:2]
    ['hf_oto', 'oto']
    ```
    """
    pipeline_tag = pipeline_tag or PIPELINE_TAGS.get(auto_class)
    repo_id = repo_id or LOCAL_REPO_PLACEHOLDER
    model_name = card_title(model_name, repo_id, base_model, pipeline_tag)
    card_data = ModelCardData(
        base_model=base_model,
        datasets=list(datasets) if datasets else None,
        license=license,
        language=language,
        library_name=LIBRARY_NAME,
        pipeline_tag=pipeline_tag,
        tags=list(dict.fromkeys([*DEFAULT_TAGS, *tags])),
        model_name=model_name,
        eval_results=eval_results(
            metrics,
            task_type=pipeline_tag,
            dataset_type=datasets[0] if datasets else None,
            dataset_name=eval_dataset_name,
            dataset_config=eval_dataset_config,
            dataset_split=eval_dataset_split,
        ),
    )
    kinds = kinds_in(report.layout_before)
    size_rows = [
        (kind.card_label, kind.total(report.layout_before), kind.total(report.layout_after)) for kind in kinds
    ]
    size_rows = [(label, before, after, _ratio(after, before)) for label, before, after in size_rows]
    image_flops = not report.layout_before.is_transformer
    metrics_table = (
        _markdown_table(["metric", "value"], [(name, f"{value:.4g}") for name, value in metrics.items()])
        if metrics
        else ""
    )
    speedup_table = ""
    if speedup:
        speedup_table = _markdown_table(
            ["setting", "value"],
            [(key, value) for key, value in speedup.items() if not isinstance(value, (dict, list))],
        )
    hyperparameters_table = (
        _markdown_table(["name", "value"], [(key, value) for key, value in (hyperparameters or {}).items()])
        if hyperparameters
        else "(not recorded)"
    )
    task = auto_class.replace("AutoModelFor", "")
    groups = " and ".join(kind.description for kind in kinds)
    base_model_text = f"`{base_model}`" if base_model else "the base model"
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=model_name,
        repo_id=repo_id,
        pipeline_tag=pipeline_tag,
        processor_arg="image_processor" if pipeline_tag in IMAGE_TASKS else "tokenizer",
        processor_class="AutoImageProcessor" if pipeline_tag in IMAGE_TASKS else "AutoTokenizer",
        base_model_text=base_model_text,
        method_text=_method_text(hyperparameters or {}, groups, base_model_text),
        auto_class=auto_class,
        ort_class=f"ORTModelFor{task}" if task != "AutoModel" else "ORTModelForFeatureExtraction",
        has_onnx=has_onnx,
        params_before=f"{report.params_before:,}",
        params_after=f"{report.params_after:,}",
        params_ratio=_ratio(report.params_after, report.params_before),
        flops_before=f"{report.flops_before:,}",
        flops_after=f"{report.flops_after:,}",
        flops_ratio=_ratio(report.flops_after, report.flops_before),
        seq_length=report.seq_length,
        image_flops=image_flops,
        size_rows=size_rows,
        kept_title=f"Kept {' and '.join(kind.label for kind in kinds)} per layer",
        layout_table=layout_table(report),
        plot_file=PLOT_FILE,
        metrics_table=metrics_table,
        speedup_table=speedup_table,
        hyperparameters_table=hyperparameters_table,
        training_data=training_data or "",
    )


def _method_text(hyperparameters: Mapping[str, Any], groups: str, base_model_text: str) -> str:
    """One sentence on how the zero groups were chosen, for the mode the hyper-parameters record."""
    if hyperparameters.get("oto_mode") == "target":
        goals = []
        if hyperparameters.get("oto_target_flops") is not None:
            goals.append(f"{hyperparameters['oto_target_flops']:.0%} of the dense model's FLOPs")
        if hyperparameters.get("oto_target_params") is not None:
            goals.append(f"{hyperparameters['oto_target_params']:.0%} of its parameters")
        default = "" if hyperparameters.get("oto_target_stated", True) else " (the default target: none was stated)"
        return (
            f"in HSPG's target mode, the whole {groups} of {base_model_text} that the loss could best spare per unit "
            f"of cost (accumulated first-order Taylor saliency) were selected, a few at a time, to keep "
            f"{' and '.join(goals) or 'the stated cost'}{default}, and each was ramped to exactly zero during the one "
            "training run while the rest kept training"
        )
    return f"the HSPG optimizer drove whole {groups} of {base_model_text} to exactly zero under a group-lasso penalty"


def write_model_card(directory: str | os.PathLike, report: PruningReport, **card_kwargs: Any) -> Path:
    """Writes `README.md` (the card) and `oto_layout.png` (the per-layer plot) into `directory`.

    Keyword arguments go to [`create_model_card`]. Returns the path of the card.

    Example:

    ```python
    >>> write_model_card("slim-model", report, base_model="bert-base-uncased", metrics={"f1": 88.1})
    PosixPath('slim-model/README.md')
    ```
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    plot_layout(report, directory / PLOT_FILE)
    card = create_model_card(report, **card_kwargs)
    path = directory / "README.md"
    card.save(path)
    return path
