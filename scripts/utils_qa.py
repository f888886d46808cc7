"""SQuAD v1.1 for extractive question answering: local files, features with a doc stride, n-best post-processing,
and the official exact-match / F1 metric computed offline (`evaluate.load("squad")` needs the hub).

A sibling of `run_squad_oto.py` and `trainer_qa.py` (as `utils_qa.py` in transformers'
`examples/pytorch/question-answering`), imported as `import utils_qa`: the script's folder is on `sys.path` when it
runs as `python scripts/run_squad_oto.py`.
"""

from __future__ import annotations

import collections
import json
import os
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from transformers.utils import logging


logger = logging.get_logger("hf_oto.utils_qa")

SQUAD_COLUMNS = ("id", "title", "context", "question", "answers")


# ----------------------------------------------------------------------------------------------------------------
# Loading local SQuAD-format files
# ----------------------------------------------------------------------------------------------------------------
def _not_squad(path: str | os.PathLike, problem: str) -> ValueError:
    return ValueError(
        f"{path} is not a SQuAD-format file: {problem}. Expected either the official SQuAD v1.1 JSON "
        '({"version": ..., "data": [{"title": ..., "paragraphs": [{"context": ..., "qas": [{"id": ..., "question": '
        '..., "answers": [{"text": ..., "answer_start": ...}]}]}]}]}) or JSON lines / a JSON list of flat records with '
        'the columns "id", "context", "question" and "answers" ({"text": [...], "answer_start": [...]}).'
    )


ALIGN_WINDOW = 50
"""How far (in characters) from `answer_start` an answer that differs from its context only by whitespace is looked
for."""


def _unanswerable(path: str | os.PathLike, where: str) -> ValueError:
    return ValueError(
        f"{path} holds SQuAD v2 data: {where} is unanswerable (`is_impossible` or no answer). hf_oto trains and "
        "evaluates SQuAD v1.1 only (every question has an answer in its context; the v1.1 metric has no 'no answer'"
        "), so the run would fail at evaluation. Use SQuAD v1.1 files, or drop the unanswerable questions."
    )


def align_answer(context: str, text: str, start: int) -> tuple[str, int] | None:
    """Where `text` is in `context`: `(text, start)` when it is at `start`, else the span of `context` equal to `text`
    up to whitespace (doubled spaces, a newline) nearest to `start` within [`ALIGN_WINDOW`] characters, as
    `(span, span_start)`; `None` when there is none.

    Example:

    ```python
    >>> align_answer("in  the North\nSea.", "the North Sea", 4)
    ('the North\nSea', 4)
    ```
    """
    if context[start : start + len(text)] == text:
        return text, start
    words = text.split()
    if not words:
        return None
    pattern = re.compile(r"\s+".join(re.escape(word) for word in words))
    matches = pattern.finditer(context, max(0, start - ALIGN_WINDOW), start + len(text) + 2 * ALIGN_WINDOW)
    near = [m for m in matches if abs(m.start() - start) <= ALIGN_WINDOW]
    if not near:
        return None
    best = min(near, key=lambda m: abs(m.start() - start))
    return best.group(), best.start()


class _SquadReader:
    """Checks the entries of one SQuAD file, naming the location of the first bad one, and counts realigned answers."""

    def __init__(self, path: str | os.PathLike):
        self.path = path
        self.realigned = 0
        self.locations: dict[str, str] = {}

    def fail(self, where: str, problem: str) -> ValueError:
        return _not_squad(self.path, f"{where}: {problem}")

    def record(
        self, where: str, qid: Any, title: Any, context: Any, question: Any, answers: list[tuple[Any, Any]]
    ) -> dict[str, Any]:
        if not isinstance(qid, (str, int)) or isinstance(qid, bool) or str(qid) == "":
            raise self.fail(where, f'"id" must be a non-empty string; got {qid!r}')
        qid = str(qid)
        where = f"{where} (id {qid!r})"
        if qid in self.locations:
            raise _not_squad(
                self.path,
                f"the question id {qid!r} is used twice ({self.locations[qid]} and {where}); ids must be unique, "
                "or the predictions of one question overwrite the other's and exact match / F1 are wrong",
            )
        self.locations[qid] = where
        if not isinstance(context, str):
            raise self.fail(where, f'"context" must be a string; got {type(context).__name__}')
        if not isinstance(question, str) or not question.strip():
            raise self.fail(where, f'"question" must be a non-empty string; got {question!r}')
        if not answers:
            raise _unanswerable(self.path, where)
        texts, starts = [], []
        for index, (text, start) in enumerate(answers):
            if not isinstance(text, str) or not text.strip():
                raise self.fail(where, f'answer {index} has no "text" (got {text!r})')
            if not isinstance(start, int) or isinstance(start, bool) or not 0 <= start < len(context):
                raise self.fail(where, f'answer {index} has "answer_start" {start!r}, not an index into its context')
            aligned = align_answer(context, text, start)
            if aligned is None:
                raise self.fail(where, f"answer {index} {text!r} is not found at answer_start={start} of its context")
            if aligned != (text, start):
                self.realigned += 1
            texts.append(aligned[0])
            starts.append(aligned[1])
        return {
            "id": qid,
            "title": title if isinstance(title, str) else "",
            "context": context,
            "question": question,
            "answers": {"text": texts, "answer_start": starts},
        }

    def nested(self, payload: dict) -> list[dict[str, Any]]:
        records = []
        if not isinstance(payload.get("data"), list):
            raise _not_squad(self.path, f'the top-level object has no "data" list (keys: {sorted(payload)[:5]})')
        for a, article in enumerate(payload["data"]):
            if not isinstance(article, dict) or not isinstance(article.get("paragraphs"), list):
                raise self.fail(f"article {a}", 'it is not an object with a "paragraphs" list')
            for p, paragraph in enumerate(article["paragraphs"]):
                where = f"article {a}, paragraph {p}"
                if not isinstance(paragraph, dict) or "context" not in paragraph or "qas" not in paragraph:
                    raise self.fail(where, 'it is not an object with "context" and "qas"')
                if not isinstance(paragraph["qas"], list):
                    raise self.fail(where, '"qas" must be a list of questions')
                for q, qa in enumerate(paragraph["qas"]):
                    here = f"{where}, question {q}"
                    if not isinstance(qa, dict):
                        raise self.fail(here, f"it is a {type(qa).__name__}, not an object")
                    missing = [key for key in ("id", "question", "answers") if key not in qa]
                    if missing:
                        raise self.fail(here, f"it lacks {missing}")
                    if qa.get("is_impossible"):
                        raise _unanswerable(self.path, f"{here} (id {qa['id']!r})")
                    if not isinstance(qa["answers"], list) or not all(isinstance(x, dict) for x in qa["answers"]):
                        raise self.fail(here, f'"answers" must be a list of objects; got {qa["answers"]!r}')
                    pairs = [(answer.get("text"), answer.get("answer_start")) for answer in qa["answers"]]
                    records.append(
                        self.record(
                            here, qa["id"], article.get("title", ""), paragraph["context"], qa["question"], pairs
                        )
                    )
        return records

    def flat(self, payload: list) -> list[dict[str, Any]]:
        records = []
        for index, record in enumerate(payload):
            where = f"record {index}"
            if not isinstance(record, dict):
                raise self.fail(where, f"it is a {type(record).__name__}, not an object")
            missing = [key for key in ("id", "context", "question", "answers") if key not in record]
            if missing:
                raise self.fail(where, f"it lacks the columns {missing}")
            answers = record["answers"]
            texts = answers.get("text") if isinstance(answers, dict) else None
            starts = answers.get("answer_start") if isinstance(answers, dict) else None
            if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
                raise self.fail(where, f"malformed answers {answers!r}")
            records.append(
                self.record(
                    where,
                    record["id"],
                    record.get("title", ""),
                    record["context"],
                    record["question"],
                    list(zip(texts, starts)),
                )
            )
        return records


def read_squad_file(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads a local SQuAD v1.1-format file into flat records `{"id", "title", "context", "question", "answers"}`.

    Accepts the official nested SQuAD v1.1 JSON and flat JSON lines / JSON lists (the layout of the `squad` dataset
    on the Hub). An answer whose text differs from its context only by whitespace (doubled spaces, a newline; the
    official files have some) is aligned to the span of the context nearest to its `answer_start` (the official
    metric normalises whitespace) and the number of such answers is logged. Anything else raises a `ValueError` that
    says what is wrong and where (article, paragraph and question index, or record index, and the question id):
    malformed entries, duplicate question ids, and SQuAD v2 data (unanswerable questions), which is not supported.

    Example:

    ```python
    >>> records = read_squad_file("dev-v1.1.json")
    >>> records[0]["answers"]
    {'text': ['Denver Broncos'], 'answer_start': [177]}
    ```
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"The SQuAD file {path} does not exist.")
    text = path.read_text(encoding="utf-8")
    try:
        payload = json.loads(text)
    except json.JSONDecodeError:
        try:
            payload = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise _not_squad(path, f"it is neither JSON nor JSON lines ({error})") from None
    reader = _SquadReader(path)
    if isinstance(payload, dict):
        records = reader.nested(payload)
    elif isinstance(payload, list):
        records = reader.flat(payload)
    else:
        raise _not_squad(path, f"the top level is a {type(payload).__name__}")
    if not records:
        raise _not_squad(path, "it holds no question")
    if reader.realigned:
        logger.warning(
            f"{path}: {reader.realigned} answers differ from their context only by whitespace; aligned them to the "
            "context (the official SQuAD metric normalises whitespace)."
        )
    return records


def check_answerable(answers: Sequence[Mapping[str, Sequence]], source: str) -> None:
    """Refuses SQuAD v2 data (a question without an answer) before training, e.g. a Hub dataset's `answers` column.

    Raises:
        `ValueError`: naming the first unanswerable question.
    """
    for index, answer in enumerate(answers):
        if not answer.get("text"):
            raise _unanswerable(source, f"example {index}")


# ----------------------------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------------------------
def _tokenize_windows(examples, tokenizer, max_seq_length: int, doc_stride: int, pad_to_max_length: bool):
    """Question/context pairs as overlapping windows of the context; returns the encoding and the context's
    sequence index (1 when the tokenizer pads on the right and the question comes first)."""
    pad_right = tokenizer.padding_side == "right"
    questions = [question.lstrip() for question in examples["question"]]
    tokenized = tokenizer(
        questions if pad_right else examples["context"],
        examples["context"] if pad_right else questions,
        truncation="only_second" if pad_right else "only_first",
        max_length=max_seq_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length" if pad_to_max_length else False,
    )
    return tokenized, 1 if pad_right else 0


def prepare_train_features(examples, tokenizer, max_seq_length: int, doc_stride: int, pad_to_max_length: bool = True):
    """Tokenizes question/context pairs into overlapping windows and labels each with the answer's token span.

    Windows that do not contain the answer point at the CLS token (index 0), as in BERT's SQuAD recipe.
    """
    tokenized, context_index = _tokenize_windows(examples, tokenizer, max_seq_length, doc_stride, pad_to_max_length)
    sample_mapping = tokenized.pop("overflow_to_sample_mapping")
    offset_mapping = tokenized.pop("offset_mapping")
    tokenized["start_positions"], tokenized["end_positions"] = [], []
    for i, offsets in enumerate(offset_mapping):
        input_ids = tokenized["input_ids"][i]
        cls_index = input_ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in input_ids else 0
        sequence_ids = tokenized.sequence_ids(i)
        answers = examples["answers"][sample_mapping[i]]
        if len(answers["answer_start"]) == 0:
            tokenized["start_positions"].append(cls_index)
            tokenized["end_positions"].append(cls_index)
            continue
        start_char = answers["answer_start"][0]
        end_char = start_char + len(answers["text"][0])
        token_start = 0
        while sequence_ids[token_start] != context_index:
            token_start += 1
        token_end = len(input_ids) - 1
        while sequence_ids[token_end] != context_index:
            token_end -= 1
        if not (offsets[token_start][0] <= start_char and offsets[token_end][1] >= end_char):
            tokenized["start_positions"].append(cls_index)
            tokenized["end_positions"].append(cls_index)
            continue
        while token_start < len(offsets) and offsets[token_start][0] <= start_char:
            token_start += 1
        tokenized["start_positions"].append(token_start - 1)
        while offsets[token_end][1] >= end_char:
            token_end -= 1
        tokenized["end_positions"].append(token_end + 1)
    return tokenized


def prepare_eval_features(examples, tokenizer, max_seq_length: int, doc_stride: int, pad_to_max_length: bool = True):
    """Tokenizes evaluation examples into windows that keep their example id and the context's offsets."""
    tokenized, context_index = _tokenize_windows(examples, tokenizer, max_seq_length, doc_stride, pad_to_max_length)
    sample_mapping = tokenized.pop("overflow_to_sample_mapping")
    tokenized["example_id"] = []
    for i in range(len(tokenized["input_ids"])):
        sequence_ids = tokenized.sequence_ids(i)
        tokenized["example_id"].append(examples["id"][sample_mapping[i]])
        tokenized["offset_mapping"][i] = [
            offset if sequence_ids[k] == context_index else None
            for k, offset in enumerate(tokenized["offset_mapping"][i])
        ]
    return tokenized


def postprocess_qa_predictions(
    examples,
    features,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    n_best_size: int = 20,
    max_answer_length: int = 30,
) -> dict[str, str]:
    """Turns start/end logits of every window into the best answer text of every example (n-best search).

    Args:
        examples: The raw examples (with `id` and `context`).
        features: The windows from [`prepare_eval_features`] (with `example_id` and `offset_mapping`).
        start_logits, end_logits (`np.ndarray`): `[num_features, seq_len]` logits of the model.
        n_best_size (`int`): How many start and end candidates to combine per window.
        max_answer_length (`int`): Longest answer, in tokens.

    Returns:
        `dict[str, str]`: example id → predicted answer text.
    """
    if len(features) != len(start_logits):
        raise ValueError(f"Got {len(start_logits)} predictions for {len(features)} features.")
    features_per_example = collections.defaultdict(list)
    for index, example_id in enumerate(features["example_id"]):
        features_per_example[example_id].append(index)
    offsets_all = features["offset_mapping"]
    predictions: dict[str, str] = {}
    for example in examples:
        context = example["context"]
        best_text, best_score = "", -np.inf
        for feature_index in features_per_example[example["id"]]:
            starts, ends = start_logits[feature_index], end_logits[feature_index]
            offsets = offsets_all[feature_index]
            start_candidates = np.argsort(starts)[-1 : -n_best_size - 1 : -1]
            end_candidates = np.argsort(ends)[-1 : -n_best_size - 1 : -1]
            for start in start_candidates:
                for end in end_candidates:
                    if start >= len(offsets) or end >= len(offsets) or offsets[start] is None or offsets[end] is None:
                        continue
                    if end < start or end - start + 1 > max_answer_length:
                        continue
                    score = starts[start] + ends[end]
                    if score > best_score:
                        best_score = score
                        best_text = context[offsets[start][0] : offsets[end][1]]
        predictions[example["id"]] = best_text
    return predictions


# ----------------------------------------------------------------------------------------------------------------
# The official SQuAD v1.1 metric
# ----------------------------------------------------------------------------------------------------------------
def normalize_answer(text: str) -> str:
    """Lower case, strip punctuation, articles and extra white space (the official SQuAD v1.1 normalisation)."""
    text = text.lower()
    text = "".join(character for character in text if character not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _f1(prediction: str, truth: str) -> float:
    prediction_tokens, truth_tokens = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(truth_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(prediction_tokens), overlap / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: Mapping[str, str], references: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Exact match and F1 (in percent) of SQuAD v1.1, the maximum over each question's reference answers.

    Example:

    ```python
    >>> squad_metrics({"q1": "the Denver Broncos"}, [{"id": "q1", "answers": {"text": ["Denver Broncos"]}}])
    {'exact_match': 100.0, 'f1': 100.0}
    ```
    """
    exact, f1, total = 0.0, 0.0, 0
    for reference in references:
        total += 1
        prediction = predictions.get(reference["id"])
        if prediction is None:
            logger.warning(f"No prediction for question {reference['id']}; it counts as wrong.")
            continue
        truths = reference["answers"]["text"]
        if not truths:
            raise _unanswerable("The references", f"question {reference['id']!r}")
        exact += max(float(normalize_answer(prediction) == normalize_answer(truth)) for truth in truths)
        f1 += max(_f1(prediction, truth) for truth in truths)
    if total == 0:
        raise ValueError("squad_metrics got no reference question.")
    return {"exact_match": 100.0 * exact / total, "f1": 100.0 * f1 / total}
