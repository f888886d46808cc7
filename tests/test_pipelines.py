"""Every slim model runs in `transformers.pipeline` for its task after `load_pruned_model`: text classification,
question answering (with the tokenizer saved alongside) and image classification (with `OTOImageProcessor`)."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    pipeline,
)

from hf_oto import OTOImageProcessor, build_zigs, load_pruned_model, prune_and_measure, save_pruned_model
from hf_oto.data.images import ImagePreprocessor
from hf_oto.models import CifarConvNetConfig, CifarConvNetForImageClassification

from .testing_utils import SPECIAL_TOKENS, tiny_bert_config, word_tokenizer


WORDS = ["the", "river", "flows", "north", "where", "does", "go", "?", "film", "was", "good", "bad", "."]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return word_tokenizer(tmp_path_factory.mktemp("vocab"), WORDS)


def _slim(model, fraction=0.4):
    zigs = build_zigs(model)
    zigs.set_zero(zigs.random_zero_mask(fraction, generator=torch.Generator().manual_seed(0)))
    slim, report = prune_and_measure(
        model.eval(), zigs, **({"seq_length": 16} if hasattr(model.config, "vocab_size") else {})
    )
    assert report.params_after < report.params_before
    return slim.eval()


def _bert_config(**extra):
    return tiny_bert_config(len(SPECIAL_TOKENS) + len(WORDS), **extra)


def test_text_classification_pipeline(tmp_path, tokenizer):
    torch.manual_seed(0)
    config = _bert_config(
        num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1}
    )
    slim = _slim(BertForSequenceClassification(config))
    save_pruned_model(slim, tmp_path, tokenizer)
    model = load_pruned_model(tmp_path, auto_class=AutoModelForSequenceClassification)
    classify = pipeline("text-classification", model=model, tokenizer=str(tmp_path), device="cpu")
    (prediction,) = classify("the film was good .")
    with torch.no_grad():
        probabilities = slim(**tokenizer("the film was good .", return_tensors="pt")).logits.softmax(-1)[0]
    assert prediction["label"] == config.id2label[int(probabilities.argmax())]
    assert prediction["score"] == pytest.approx(float(probabilities.max()), abs=1e-5)


def test_question_answering_pipeline(tmp_path, tokenizer):
    from transformers.pipelines import SUPPORTED_TASKS

    if "question-answering" not in SUPPORTED_TASKS:
        pytest.skip("transformers 5 removed the question-answering pipeline")
    torch.manual_seed(0)
    slim = _slim(BertForQuestionAnswering(_bert_config()))
    save_pruned_model(slim, tmp_path, tokenizer)
    model = load_pruned_model(tmp_path, auto_class=AutoModelForQuestionAnswering)
    answer = pipeline("question-answering", model=model, tokenizer=str(tmp_path), device="cpu")
    result = answer(question="where does the river go ?", context="the river flows north .")
    assert set(result) == {"score", "start", "end", "answer"}
    assert result["answer"] == "the river flows north ."[result["start"] : result["end"]]
    assert 0.0 <= result["score"] <= 1.0


@pytest.mark.parametrize("num_channels", [1, 3])
def test_image_classification_pipeline(tmp_path, num_channels):
    torch.manual_seed(0)
    config = CifarConvNetConfig(
        architecture="vgg", vgg_layers=[8, "M", 12, 12, "M"], image_size=8, classifier_hidden=10, num_labels=3,
        num_channels=num_channels, id2label={0: "cat", 1: "dog", 2: "fish"}, label2id={"cat": 0, "dog": 1, "fish": 2},
    )  # fmt: skip
    slim = _slim(CifarConvNetForImageClassification(config), fraction=0.3)
    mean, std = [0.4] * num_channels, [0.3] * num_channels
    save_pruned_model(slim, tmp_path, OTOImageProcessor(image_size=8, num_channels=num_channels, image_mean=mean,
                                                        image_std=std))  # fmt: skip
    model = load_pruned_model(tmp_path, auto_class=AutoModelForImageClassification)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(processor, OTOImageProcessor) and processor.image_mean == mean
    classify = pipeline("image-classification", model=model, image_processor=processor, device="cpu")
    pixels = np.random.default_rng(0).integers(0, 256, (6, 6), dtype=np.uint8)  # grey, padded to 8 x 8
    predictions = classify(Image.fromarray(pixels, mode="L"), top_k=3)
    # The training preprocessing of the scripts, on the same image.
    expected = ImagePreprocessor("image", "label", 8, num_channels, mean, std).pixels(pixels)[None]
    with torch.no_grad():
        probabilities = slim(pixel_values=expected).logits.softmax(-1)[0]
    assert {p["label"]: round(p["score"], 5) for p in predictions} == {
        config.id2label[i]: round(float(probabilities[i]), 5) for i in range(3)
    }
