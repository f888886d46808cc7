"""End-to-end test of scripts/run_text_classification_oto.py on tiny local CSV/JSONL files, and of its input checks."""

import csv
import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from hf_oto import load_pruned_model

from .hub_mock import mock_hub, tokenizer_files
from .testing_utils import load_script, reviews, write_csv, write_jsonl, write_tiny_classifier


COMMON_ARGS = [
    "--max_seq_length", "16", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
    "--max_steps", "12", "--learning_rate", "1e-2", "--lr_scheduler_type", "constant",
    "--oto_mode", "paper", "--oto_lambda", "10", "--oto_init_steps", "4",
    "--report_to", "none", "--save_strategy", "no", "--use_cpu", "--disable_tqdm", "true",
]  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_classifier(tmp_path_factory.mktemp("tiny-bert"))


def test_csv_string_labels_end_to_end(tmp_path, model_dir):
    module = load_script("run_text_classification_oto")
    rows = reviews()
    train = write_csv(tmp_path / "train.csv", rows)
    validation = write_csv(tmp_path / "validation.csv", rows[:16])
    test = write_csv(tmp_path / "test.csv", [{"sentence": row["sentence"]} for row in rows[:6]])
    output_dir = tmp_path / "out"
    argv = [
        "--model_name_or_path", str(model_dir),
        "--train_file", str(train), "--validation_file", str(validation), "--test_file", str(test),
        "--text_column_name", "sentence", "--label_column_name", "sentiment",
        "--output_dir", str(output_dir), "--do_train", "--do_eval", "--do_predict", *COMMON_ARGS,
        # dense checkpoints during training, which must not be pushed; the slim folder pushed once at the end
        "--save_strategy", "steps", "--save_steps", "6",
        "--push_to_hub", "--hub_model_id", "reviews-oto", "--hub_private_repo", "true", "--license", "apache-2.0",
    ]  # fmt: skip
    with mock_hub() as hub:
        results, trainer = module.run(*module.parse_arguments(argv))
    assert hub.created == [{"repo_id": "me/reviews-oto", "private": True, "exist_ok": True, "repo_type": "model"}]
    (upload,) = hub.uploads
    assert upload["repo_id"] == "me/reviews-oto" and upload["folder"] == str((output_dir / "pruned").absolute())
    assert upload["files"] == sorted(
        ["README.md", "config.json", "model.safetensors", "oto_layout.png", *tokenizer_files(upload["folder"])]
    )
    assert (output_dir / "checkpoint-6").is_dir()  # a dense checkpoint was saved, not pushed
    card = upload["card"]
    assert "library_name: hf_oto" in card and "license: apache-2.0" in card and "# reviews-oto\n" in card
    assert 'load_pruned_model("me/reviews-oto", auto_class=AutoModelForSequenceClassification)' in card
    assert "- type: accuracy" in card and "pipeline_tag: text-classification" in card
    for name in ("train_results.json", "eval_results.json", "trainer_state.json"):
        assert (output_dir / name).is_file(), name

    written = json.loads((output_dir / "all_results.json").read_text())
    assert written == json.loads(json.dumps(results))
    assert written["labels"] == ["negative", "positive"]
    for key in (
        "eval_accuracy", "eval_f1", "eval_loss", "train_loss", "group_sparsity", "group_sparsity_heads",
        "group_sparsity_ffn", "group_sparsity_by_family", "zero_groups", "num_groups", "params", "flops",
        "dense_params", "dense_flops", "params_ratio", "flops_ratio", "pruned_model_dir",
    ):  # fmt: skip
        assert key in written, key
    assert 0.0 <= written["eval_accuracy"] <= 1.0 and 0.0 <= written["eval_f1"] <= 1.0
    assert written["eval_samples"] == 16 and written["train_samples"] == 40 and written["predict_samples"] == 6
    assert written["zero_groups"] > 0, "λ=10 at lr 1e-2 must zero groups in 8 half-space steps"
    assert 0.0 < written["group_sparsity"] <= 1.0
    assert written["params"] < written["dense_params"] and written["flops"] < written["dense_flops"]
    assert written["params_ratio"] == pytest.approx(written["params"] / written["dense_params"])
    assert len(written["group_sparsity_by_family"]) == 4  # heads and ffn of 2 layers
    predictions = (output_dir / "predict_results.txt").read_text().splitlines()
    assert predictions[0] == "index\tprediction" and len(predictions) == 7
    assert {line.split("\t")[1] for line in predictions[1:]} <= {"negative", "positive"}

    assert written["pruned_model_dir"] == "pruned"  # relative to output_dir
    pruned = output_dir / written["pruned_model_dir"]
    for name in ("config.json", "model.safetensors", "README.md", "tokenizer.json"):
        assert (pruned / name).is_file(), name
    reloaded = load_pruned_model(pruned, auto_class=AutoModelForSequenceClassification)
    assert reloaded.config.id2label == {0: "negative", 1: "positive"}
    assert sum(p.numel() for p in reloaded.parameters()) == written["params"]
    slim = trainer.model.eval()
    reloaded.eval()
    batch = trainer.processing_class([row["sentence"] for row in rows[:8]], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, slim(**batch).logits)


def test_jsonl_sentence_pairs_integer_labels(tmp_path, model_dir):
    rows = [
        {"first": row["sentence"], "second": "the plot was good .", "label": int(row["sentiment"] == "positive")}
        for row in reviews()
    ]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    output_dir = tmp_path / "out"
    results = load_script("run_text_classification_oto").main(
        [
            "--model_name_or_path", str(model_dir), "--train_file", str(data), "--validation_file", str(data),
            "--text_column_name", "first", "--text_pair_column_name", "second", "--max_eval_samples", "8",
            "--pruned_model_dir", str(tmp_path / "slim"), "--pad_to_max_length",
            "--output_dir", str(output_dir), "--do_train", "--do_eval", *COMMON_ARGS,
        ]
    )  # fmt: skip
    assert results["labels"] == ["0", "1"] and results["eval_samples"] == 8
    assert results["zero_groups"] > 0 and results["params"] < results["dense_params"]
    assert (tmp_path / "slim" / "README.md").is_file() and results["pruned_model_dir"] == "../slim"


def test_label_names_of_a_class_label_column():
    from datasets import ClassLabel, Dataset, Features, Value

    module = load_script("run_text_classification_oto")
    features = Features({"text": Value("string"), "label": ClassLabel(names=["negative", "positive"])})
    dataset = Dataset.from_dict({"text": ["a", "b", "c"], "label": [1, 0, 1]}, features=features)
    labels = module.build_label_list(dataset, "label")
    assert labels == [0, 1] and module.label_names(dataset, "label", labels) == ["negative", "positive"]
    plain = Dataset.from_dict({"label": ["b", "a", "b"]})
    assert module.label_names(plain, "label", module.build_label_list(plain, "label")) == ["a", "b"]


def _main_error(tmp_path, model_dir, *extra):
    argv = ["--model_name_or_path", str(model_dir), "--output_dir", str(tmp_path / "o"), "--do_train", "--do_eval"]
    return load_script("run_text_classification_oto").main([*argv, *extra, "--report_to", "none", "--use_cpu"])


def test_missing_label_column_names_the_columns(tmp_path, model_dir):
    data = write_csv(tmp_path / "train.csv", reviews())
    with pytest.raises(
        ValueError, match=r"no column 'label' \(--label_column_name\); its columns are: sentence, sentiment"
    ):
        _main_error(tmp_path, model_dir, "--train_file", str(data), "--validation_file", str(data))


def test_missing_text_column_names_the_columns(tmp_path, model_dir):
    data = write_csv(tmp_path / "train.csv", reviews())
    with pytest.raises(ValueError, match=r"no column 'review' \(--text_column_name\); its columns are: sentence"):
        _main_error(
            tmp_path, model_dir, "--train_file", str(data), "--validation_file", str(data),
            "--text_column_name", "review", "--label_column_name", "sentiment",
        )  # fmt: skip


def test_unknown_extension(tmp_path, model_dir):
    data = tmp_path / "train.parquet"
    data.write_text("x")
    with pytest.raises(ValueError, match=r"--train_file .*train\.parquet' has an unknown extension '\.parquet'"):
        _main_error(tmp_path, model_dir, "--train_file", str(data))


def test_unseen_validation_label(tmp_path, model_dir):
    rows = reviews()
    train = write_csv(tmp_path / "train.csv", rows)
    validation = write_csv(
        tmp_path / "validation.csv", [*rows[:4], {"sentence": "the plot was dull .", "sentiment": "mixed"}]
    )
    with pytest.raises(ValueError, match=r"labels that the training data never has: \['mixed'\]"):
        _main_error(
            tmp_path, model_dir, "--train_file", str(train), "--validation_file", str(validation),
            "--label_column_name", "sentiment",
        )  # fmt: skip


def test_empty_training_set(tmp_path, model_dir):
    rows = [{"sentence": "", "sentiment": "positive"}, {"sentence": "  ", "sentiment": "negative"}]
    train = write_csv(tmp_path / "train.csv", rows)
    with pytest.raises(ValueError, match="The train split is empty"):
        _main_error(
            tmp_path, model_dir, "--train_file", str(train), "--validation_file", str(train),
            "--label_column_name", "sentiment",
        )  # fmt: skip


def _splits(tmp_path, train, **extra):
    utils = load_script("utils_text_classification")
    args = utils.DataTrainingArguments(train_file=str(train), label_column_name="sentiment", **extra)
    return utils.load_text_classification_splits(args, str(tmp_path / "cache"), do_eval=False, do_predict=False)


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_labels_and_texts_named_like_missing_values_are_read_as_written(tmp_path, suffix):
    rows = [
        {"sentence": f"{text} {index}", "sentiment": label}
        for index, (text, label) in enumerate(
            [("NA", "None"), ("null", "NA"), ("nan", "null"), ("None", "positive"), ("n/a", "N/A")] * 2
        )
    ]
    path = tmp_path / f"train{suffix}"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(
            handle, fieldnames=["sentence", "sentiment"], delimiter="\t" if suffix == ".tsv" else ","
        )
        writer.writeheader()
        writer.writerows(rows)
    data = _splits(tmp_path, path)
    assert data.label_list == ["N/A", "NA", "None", "null", "positive"]
    assert len(data.splits["train"]) == 10
    assert data.splits["train"]["sentence"][:2] == ["NA 0", "null 1"]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_an_empty_label_is_an_error_naming_its_row(tmp_path, suffix):
    rows = reviews()[:6]
    rows[2]["sentiment"] = None if suffix == ".jsonl" else ""
    rows[4]["sentiment"] = "  " if suffix == ".jsonl" else ""
    path = tmp_path / f"train{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, rows)
    else:
        with open(path, "w", newline="") as handle:
            delimiter = "\t" if suffix == ".tsv" else ","
            writer = csv.DictWriter(handle, fieldnames=["sentence", "sentiment"], delimiter=delimiter)
            writer.writeheader()
            writer.writerows(rows)
    with pytest.raises(ValueError, match=r"2 rows with an empty 'sentiment' label: rows \[2, 4\]"):
        _splits(tmp_path, path)
