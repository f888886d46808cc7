"""Model cards of pruned checkpoints."""

import torch
import yaml

from hf_oto import build_zigs
from hf_oto.model_card import PLOT_FILE, write_model_card
from hf_oto.report import prune_and_measure

from .tiny_models import tiny_model


def _pruned_report(name: str):
    model = tiny_model(name)
    zigs = build_zigs(model)
    zigs.set_zero(zigs.random_zero_mask(0.5, generator=torch.Generator().manual_seed(0)))
    _, report = prune_and_measure(model, zigs, seq_length=32)
    return report


def test_card_has_metadata_sizes_layout_plot_and_loading_lines(tmp_path):
    report = _pruned_report("llama")
    path = write_model_card(
        tmp_path,
        report,
        model_name="tiny-llama-oto",
        repo_id="me/tiny-llama-oto",
        base_model="me/tiny-llama",
        datasets=["squad"],
        license="apache-2.0",
        auto_class="AutoModelForCausalLM",
        hyperparameters={"oto_mode": "paper", "oto_lambda": 0.01, "oto_variant": "adamw"},
        metrics={"exact_match": 71.25},
        has_onnx=True,
        training_data="Six questions about rivers.",
    )
    text = path.read_text()
    metadata = yaml.safe_load(text.split("---")[1])
    assert metadata["base_model"] == "me/tiny-llama"
    assert metadata["datasets"] == ["squad"]
    assert metadata["license"] == "apache-2.0"
    assert {"pruning", "oto"} <= set(metadata["tags"])
    assert f"| parameters | {report.params_before:,} | {report.params_after:,} |" in text
    assert f"| {report.flops_before:,} | {report.flops_after:,} |" in text
    assert "| oto_lambda | 0.01 |" in text
    assert "drove whole attention heads and FFN rows of `me/tiny-llama` to exactly zero under a group-lasso" in text
    assert "## Training\n\nSix questions about rivers.\n" in text
    assert "| exact_match | 71.25 |" in text
    assert 'load_pruned_model("me/tiny-llama-oto", auto_class=AutoModelForCausalLM)' in text
    assert "from transformers import AutoModelForCausalLM" in text
    assert 'ORTModelForCausalLM.from_pretrained("me/tiny-llama-oto", subfolder="onnx")' in text
    for layer, (heads, kv, ffn) in enumerate(
        zip(report.num_attention_heads_after, report.num_key_value_heads_after, report.intermediate_size_after)
    ):
        assert f"| {layer} | {heads} / 4 | {kv} / 2 | {ffn} / 37 |" in text
    plot = tmp_path / PLOT_FILE
    assert f"]({PLOT_FILE})" in text
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_card_says_how_the_target_mode_chose_the_groups(tmp_path):
    report = _pruned_report("bert")
    for stated, default_note in ((True, False), (False, True)):
        text = write_model_card(
            tmp_path / str(stated),
            report,
            hyperparameters={"oto_mode": "target", "oto_target_flops": 0.5, "oto_target_stated": stated},
        ).read_text()
        assert "target mode" in text and "to keep 50% of the dense model's FLOPs" in text
        assert "group-lasso penalty" not in text
        assert ("the default target: none was stated" in text) is default_note


def test_card_without_optional_sections(tmp_path):
    report = _pruned_report("bert")
    text = write_model_card(tmp_path, report).read_text()
    assert "## Measured speedup" not in text
    assert "## Evaluation" not in text
    assert "onnx/" not in text
    assert "(not recorded)" in text
    assert "```\n\n## Size" in text  # sections left out leave no blank lines behind


def test_card_metadata_promises_only_what_loads(tmp_path):
    """library_name is hf_oto (not transformers: plain from_pretrained fails on a slim folder), the pipeline tag follows
    the task, the evaluation metrics are a model-index, and the text says what the Hub widget cannot do."""
    report = _pruned_report("bert")
    text = write_model_card(
        tmp_path,
        report,
        repo_id="me/bert-sst2-oto",
        base_model="bert-base-uncased",
        datasets=["glue"],
        license="apache-2.0",
        auto_class="AutoModelForSequenceClassification",
        metrics={"eval_accuracy": 0.9, "eval_loss": 0.3, "eval_runtime": 1.0, "eval_samples": 16},
        eval_dataset_name="GLUE SST-2",
        eval_dataset_config="sst2",
        eval_dataset_split="validation",
        has_onnx=True,
    ).read_text()
    metadata = yaml.safe_load(text.split("---")[1])
    assert metadata["library_name"] == "hf_oto"
    assert metadata["pipeline_tag"] == "text-classification"
    assert metadata["base_model"] == "bert-base-uncased" and metadata["license"] == "apache-2.0"
    (entry,) = metadata["model-index"]
    assert entry["name"] == "bert-sst2-oto"
    (result,) = entry["results"]
    assert result["task"] == {"type": "text-classification"}
    assert result["dataset"] == {"type": "glue", "name": "GLUE SST-2", "config": "sst2", "split": "validation"}
    assert result["metrics"] == [{"type": "accuracy", "value": 0.9}]
    assert text.split("---", 2)[2].lstrip().startswith("# bert-sst2-oto\n")
    assert "cannot run it" in text and "from_pretrained" in text
    assert 'pipe = pipeline("text-classification", model=model, tokenizer="me/bert-sst2-oto")' in text
    assert 'ORTModelForSequenceClassification.from_pretrained("me/bert-sst2-oto", subfolder="onnx")' in text
    assert 'AutoTokenizer.from_pretrained("me/bert-sst2-oto", subfolder="onnx")' in text
    assert "without\nhf_oto" in text


def test_card_title_is_never_a_folder_name():
    from hf_oto.model_card import card_title

    assert card_title(repo_id="me/bert-sst2-oto") == "bert-sst2-oto"
    assert card_title(base_model="org/bert-base", pipeline_tag="question-answering") == (
        "bert-base pruned with OTO for question answering"
    )
    assert card_title() == "Model pruned with OTO"
    assert card_title("My title", repo_id="me/x") == "My title"


def test_image_card_loads_with_the_image_processor(tmp_path):
    from .tiny_convnets import tiny_vgg

    model = tiny_vgg()
    zigs = build_zigs(model)
    zigs.set_zero(zigs.random_zero_mask(0.3, generator=torch.Generator().manual_seed(0)))
    _, report = prune_and_measure(model, zigs)
    text = write_model_card(
        tmp_path, report, auto_class="AutoModelForImageClassification", metrics={"eval_accuracy": 0.5}, has_onnx=True
    ).read_text()
    metadata = yaml.safe_load(text.split("---")[1])
    assert metadata["pipeline_tag"] == "image-classification"
    assert metadata["model-index"][0]["results"][0]["dataset"]["type"] == "custom"
    assert text.split("---", 2)[2].lstrip().startswith("# Model pruned with OTO for image classification\n")
    assert 'image_processor="path/to/this/folder"' in text
    assert "import hf_oto  # registers OTOImageProcessor" in text


def test_question_answering_cards_say_the_pipeline_is_transformers_4_only(tmp_path):
    report = _pruned_report("bert-qa")
    qa = write_model_card(tmp_path / "qa", report, auto_class="AutoModelForQuestionAnswering").read_text()
    assert 'pipeline("question-answering"' in qa and "transformers 5 removed it" in qa
    other = write_model_card(tmp_path / "cls", report, auto_class="AutoModelForSequenceClassification").read_text()
    assert "transformers 5 removed it" not in other
