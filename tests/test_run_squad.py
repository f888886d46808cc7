"""End-to-end test of scripts/run_squad_oto.py on a tiny SQuAD-format fixture, and of the SQuAD helpers."""

import json

import pytest
import torch
import yaml
from datasets import Dataset
from transformers import AutoModelForQuestionAnswering, AutoTokenizer, default_data_collator

from hf_oto import OTOTrainingArguments, load_pruned_model

from .hub_mock import mock_hub
from .squad_fixture import (
    squad_json,
    squad_json_with_whitespace_answers,
    squad_v2_json,
    write_squad_file,
    write_tiny_qa_model,
)
from .testing_utils import load_script


utils_qa = load_script("utils_qa")
normalize_answer = utils_qa.normalize_answer
read_squad_file = utils_qa.read_squad_file
squad_metrics = utils_qa.squad_metrics


def test_run_squad_oto_end_to_end(tmp_path):
    model_dir = write_tiny_qa_model(tmp_path / "model")
    data = write_squad_file(tmp_path / "squad.json")
    output_dir = tmp_path / "out"
    with mock_hub() as hub:
        results = load_script("run_squad_oto").main(
        [
            "--model_name_or_path", str(model_dir),
            "--train_file", str(data),
            "--validation_file", str(data),
            "--output_dir", str(output_dir),
            "--do_train", "--do_eval",
            "--max_seq_length", "32", "--doc_stride", "8",
            "--per_device_train_batch_size", "4",
            "--max_steps", "12", "--learning_rate", "1e-2", "--lr_scheduler_type", "constant",
            "--oto_mode", "paper", "--oto_lambda", "10", "--oto_init_steps", "4",
            "--report_to", "none", "--save_strategy", "steps", "--save_steps", "6", "--use_cpu",
            "--push_to_hub", "--hub_model_id", "team/squad-oto", "--license", "mit",
        ]
    )  # fmt: skip
    written = json.loads((output_dir / "all_results.json").read_text())
    assert written == pytest.approx(results)
    assert hub.created == [{"repo_id": "team/squad-oto", "private": None, "exist_ok": True, "repo_type": "model"}]
    (upload,) = hub.uploads
    assert upload["folder"] == str((output_dir / "pruned").absolute())
    assert {"README.md", "config.json", "model.safetensors", "oto_layout.png", "tokenizer.json"} <= set(
        upload["files"]
    )
    assert not any(name.startswith(("checkpoint-", "runs", "_")) for name in upload["files"])
    assert (output_dir / "checkpoint-6").is_dir()
    card = yaml.safe_load(upload["card"].split("---")[1])
    assert card["pipeline_tag"] == "question-answering" and card["license"] == "mit"
    metrics = {m["type"]: m["value"] for m in card["model-index"][0]["results"][0]["metrics"]}
    # EM/F1 of the slim model, from QuestionAnsweringOTOTrainer.evaluate
    assert metrics == pytest.approx({"exact_match": written["eval_exact_match"], "f1": written["eval_f1"]})
    for key in ("eval_exact_match", "eval_f1", "group_sparsity", "params", "flops", "dense_params", "dense_flops"):
        assert key in written
    assert 0.0 <= written["eval_exact_match"] <= written["eval_f1"] <= 100.0
    assert written["eval_samples"] == 6
    assert written["zero_groups"] > 0, "λ=10 at lr 1e-2 must zero groups in 8 half-space steps"
    assert written["params"] < written["dense_params"]
    assert written["flops"] < written["dense_flops"]
    predictions = json.loads((output_dir / "eval_predictions.json").read_text())
    assert set(predictions) == {f"q{i}" for i in range(6)}

    assert written["pruned_model_dir"] == "pruned"
    pruned = output_dir / written["pruned_model_dir"]
    assert (pruned / "config.json").is_file() and (pruned / "model.safetensors").is_file()
    assert (pruned / "README.md").is_file() and (pruned / "tokenizer.json").is_file()
    reloaded = load_pruned_model(pruned, auto_class=AutoModelForQuestionAnswering)
    assert sum(p.numel() for p in reloaded.parameters()) == written["params"]


def test_an_output_folder_holding_another_model_is_refused_before_any_work(tmp_path):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (output_dir / "model.safetensors").write_bytes(b"another model")
    argv = [
        "--model_name_or_path", str(tmp_path / "no-model"), "--train_file", str(tmp_path / "no-data.json"),
        "--output_dir", str(output_dir), "--do_train", "--report_to", "none", "--use_cpu",
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"not this run's resumable state: config\.json, model\.safetensors"):
        load_script("run_squad_oto").main(argv)
    with pytest.raises(ValueError, match=r"--pruned_model_dir .* is or contains the output folder"):
        load_script("run_squad_oto").main([*argv, "--overwrite_output_dir", "--pruned_model_dir", str(output_dir)])
    assert sorted(path.name for path in output_dir.iterdir()) == ["config.json", "model.safetensors"]


def test_not_a_squad_file_gets_a_clear_error(tmp_path):
    model_dir = write_tiny_qa_model(tmp_path / "model")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": [1, 2, 3]}))
    with pytest.raises(ValueError, match=r'not a SQuAD-format file: the top-level object has no "data" list'):
        load_script("run_squad_oto").main(
            ["--model_name_or_path", str(model_dir), "--train_file", str(bad), "--output_dir", str(tmp_path / "o"),
             "--do_train", "--report_to", "none"]
        )  # fmt: skip


@pytest.mark.parametrize(
    "payload, problem",
    [
        ("not json at all {", "neither JSON nor JSON lines"),
        ([{"id": "1", "question": "q"}], "lacks the columns"),
        ({"data": [{"title": "t", "paragraphs": [{"context": "abc", "qas": [{"id": "1", "question": "q",
          "answers": [{"text": "zzz", "answer_start": 0}]}]}]}]}, "is not found at answer_start=0"),
        ({"data": []}, "holds no question"),
    ],
)  # fmt: skip
def test_read_squad_file_errors(tmp_path, payload, problem):
    path = tmp_path / "data.json"
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    with pytest.raises(ValueError, match=problem):
        read_squad_file(path)


def test_read_squad_file_flat_json_lines(tmp_path):
    nested = read_squad_file(write_squad_file(tmp_path / "nested.json"))
    flat = tmp_path / "flat.jsonl"
    flat.write_text("\n".join(json.dumps({k: r[k] for k in ("id", "context", "question", "answers")}) for r in nested))
    assert [r["answers"] for r in read_squad_file(flat)] == [r["answers"] for r in nested]
    assert len(nested) == sum(len(p["paragraphs"][0]["qas"]) for p in squad_json()["data"])


def test_squad_metric_matches_the_official_definition():
    references = [
        {"id": "a", "answers": {"text": ["Denver Broncos", "Broncos"]}},
        {"id": "b", "answers": {"text": ["the North Sea"]}},
        {"id": "c", "answers": {"text": ["Warsaw"]}},
    ]
    predictions = {"a": "The Denver Broncos!", "b": "North Sea coast", "c": "Paris"}
    metrics = squad_metrics(predictions, references)
    # a: exact after normalisation; b: precision 2/3, recall 2/2 -> F1 0.8; c: wrong.
    assert metrics["exact_match"] == pytest.approx(100 / 3)
    assert metrics["f1"] == pytest.approx(100 * (1 + 0.8 + 0) / 3)
    assert normalize_answer("  The  Seine, river. ") == "seine river"
    torch.manual_seed(0)


def test_run_squad_oto_exports_onnx_and_measures_speedup(tmp_path):
    pytest.importorskip("optimum.onnxruntime")
    model_dir = write_tiny_qa_model(tmp_path / "model")
    data = write_squad_file(tmp_path / "squad.json")
    output_dir = tmp_path / "out"
    results = load_script("run_squad_oto").main(
        [
            "--model_name_or_path", str(model_dir),
            "--train_file", str(data), "--validation_file", str(data),
            "--output_dir", str(output_dir), "--do_train", "--do_eval",
            "--max_seq_length", "32", "--doc_stride", "8", "--per_device_train_batch_size", "4",
            "--max_steps", "12", "--learning_rate", "1e-2", "--lr_scheduler_type", "constant",
            "--oto_mode", "paper", "--oto_lambda", "10", "--oto_init_steps", "4",
            "--export_onnx", "--benchmark_speedup", "--benchmark_repeats", "3",
            "--report_to", "none", "--save_strategy", "no", "--use_cpu",
        ]
    )  # fmt: skip
    written = json.loads((output_dir / "all_results.json").read_text())
    assert written["onnx_speedup"] > 0 and written["onnx_latency_slim_ms"] > 0
    assert written["onnx_flops_ratio"] == pytest.approx(written["dense_flops"] / written["flops"], rel=1e-6)
    assert written["onnx_dir"] == "pruned/onnx"  # relative to output_dir
    pruned = output_dir / results["pruned_model_dir"]
    assert (pruned / "onnx" / "model.onnx").is_file()
    card = (pruned / "README.md").read_text()
    assert "## Measured speedup" in card
    assert f"{written['onnx_speedup']:.2f}x" in card
    assert 'subfolder="onnx"' in card

    from optimum.onnxruntime import ORTModelForQuestionAnswering

    ort_model = ORTModelForQuestionAnswering.from_pretrained(pruned / "onnx")
    slim = load_pruned_model(pruned, auto_class=AutoModelForQuestionAnswering)
    inputs = {
        "input_ids": torch.tensor([[2, 7, 8, 9, 3, 10, 11, 3]]),
        "attention_mask": torch.ones(1, 8, dtype=torch.long),
    }
    inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    torch.testing.assert_close(
        torch.as_tensor(ort_model(**inputs).start_logits), slim(**inputs).start_logits, atol=1e-4, rtol=1e-4
    )


def test_answers_that_differ_only_by_whitespace_are_aligned_and_counted(tmp_path, monkeypatch):
    warnings = []
    monkeypatch.setattr(utils_qa.logger, "warning", warnings.append)
    path = tmp_path / "ws.json"
    path.write_text(json.dumps(squad_json_with_whitespace_answers()))
    records = read_squad_file(path)
    for record in records:
        (text,), (start,) = record["answers"]["text"], record["answers"]["answer_start"]
        assert record["context"][start : start + len(text)] == text
    assert [r["answers"]["text"][0] for r in records] == ["the  North\nSea", "Basel  and Cologne", "the Alps"]
    assert len(warnings) == 1 and "2 answers differ from their context only by whitespace" in warnings[0]
    # The official metric normalises whitespace: the aligned text is the same answer.
    assert squad_metrics({"w0": "the North Sea"}, records[:1]) == {"exact_match": 100.0, "f1": 100.0}


def test_squad_v2_is_refused_before_training(tmp_path):
    path = tmp_path / "v2.json"
    path.write_text(json.dumps(squad_v2_json()))
    with pytest.raises(ValueError, match=r"SQuAD v2 data: article 0, paragraph 0, question 2 \(id 'impossible'\)"):
        read_squad_file(path)
    model_dir = write_tiny_qa_model(tmp_path / "model")
    with pytest.raises(ValueError, match="SQuAD v2"):
        load_script("run_squad_oto").main(
            ["--model_name_or_path", str(model_dir), "--train_file", str(path), "--output_dir", str(tmp_path / "o"),
             "--do_train", "--report_to", "none"]
        )  # fmt: skip
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    with pytest.raises(ValueError, match=r"squad_v2 \(validation split\) holds SQuAD v2 data: example 1"):
        utils_qa.check_answerable([{"text": ["a"]}, {"text": [], "answer_start": []}], "squad_v2 (validation split)")
    with pytest.raises(ValueError, match="SQuAD v2"):
        squad_metrics({"q": ""}, [{"id": "q", "answers": {"text": []}}])


def _with(change):
    data = squad_json()
    change(data["data"][1]["paragraphs"][0])
    return data


@pytest.mark.parametrize(
    "payload, problem",
    [
        (_with(lambda p: p.update(context=["a", "list"])), r"article 1, paragraph 0, question 0 \(id 'q2'\): "
         r'"context" must be a string; got list'),
        (_with(lambda p: p["qas"].append("a question")), r"article 1, paragraph 0, question 2: it is a str, not an"),
        (_with(lambda p: p["qas"][1]["answers"][0].pop("text")), r"question 1 \(id 'q3'\): answer 0 has no \"text\""),
        (_with(lambda p: p["qas"][0].update(question=None)), r"question 0 \(id 'q2'\): \"question\" must be a non-empty"),
        (_with(lambda p: p["qas"][1].update(id="q0")), r"the question id 'q0' is used twice \(article 0, paragraph 0, "
         r"question 0 \(id 'q0'\) and article 1, paragraph 0, question 1 \(id 'q0'\)\)"),
        (_with(lambda p: p.update(qas={"id": 1})), r'article 1, paragraph 0: "qas" must be a list'),
        ([{"id": "1", "context": 3, "question": "q", "answers": {"text": ["a"], "answer_start": [0]}}],
         r'record 0 \(id \'1\'\): "context" must be a string'),
        ([{"id": "1", "context": "abc", "question": "q", "answers": {"text": [None], "answer_start": [0]}}],
         r"record 0 \(id '1'\): answer 0 has no \"text\""),
    ],
)  # fmt: skip
def test_malformed_entries_name_their_location(tmp_path, payload, problem):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match=r"not a SQuAD-format file: .*" + problem):
        read_squad_file(path)


def test_qa_trainer_evaluate_scores_answers_and_logs_them(tmp_path):
    """`QuestionAnsweringOTOTrainer.evaluate` gives the EM/F1 of a plain batched forward + n-best post-processing,
    writes the answers to eval_predictions.json and logs the metrics through the Trainer's log."""
    trainer_qa = load_script("trainer_qa")
    model_dir = write_tiny_qa_model(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = Dataset.from_list(read_squad_file(write_squad_file(tmp_path / "squad.json")))
    features = examples.map(
        utils_qa.prepare_eval_features,
        fn_kwargs={"tokenizer": tokenizer, "max_seq_length": 32, "doc_stride": 8},
        batched=True,
        remove_columns=examples.column_names,
    )
    model = AutoModelForQuestionAnswering.from_pretrained(model_dir).eval()
    with torch.no_grad():
        outputs = model(
            **{name: torch.tensor(features[name]) for name in ("input_ids", "attention_mask", "token_type_ids")}
        )
    expected_answers = utils_qa.postprocess_qa_predictions(
        examples,
        features,
        outputs.start_logits.numpy(),
        outputs.end_logits.numpy(),
        n_best_size=5,
        max_answer_length=8,
    )
    expected = squad_metrics(expected_answers, examples)

    args = OTOTrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_eval_batch_size=4, report_to="none", use_cpu=True
    )
    trainer = trainer_qa.QuestionAnsweringOTOTrainer(
        model=model,
        args=args,
        eval_dataset=features,
        eval_examples=examples,
        n_best_size=5,
        max_answer_length=8,
        data_collator=default_data_collator,
    )
    metrics = trainer.evaluate()
    assert metrics["eval_exact_match"] == pytest.approx(expected["exact_match"])
    assert metrics["eval_f1"] == pytest.approx(expected["f1"])
    assert metrics["eval_runtime"] >= 0.0
    logged = trainer.state.log_history[-1]
    assert logged["eval_exact_match"] == metrics["eval_exact_match"] and logged["eval_f1"] == metrics["eval_f1"]
    assert json.loads((tmp_path / "out" / "eval_predictions.json").read_text()) == expected_answers

    with pytest.raises(ValueError, match="needs the evaluation features and the examples"):
        trainer_qa.QuestionAnsweringOTOTrainer(model=model, args=args).evaluate()
    with pytest.raises(ValueError, match=r"columns \['example_id', 'offset_mapping'\]"):
        trainer.evaluate(eval_dataset=features.remove_columns("example_id"))
    with pytest.raises(ValueError, match="n_best_size must be a positive integer; got 0"):
        trainer_qa.QuestionAnsweringOTOTrainer(model=model, args=args, n_best_size=0)
