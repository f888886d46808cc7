"""A tiny SQuAD v1.1-format dataset and a tiny BERT question-answering model with its own vocabulary (no hub)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import BertForQuestionAnswering

from .testing_utils import SPECIAL_TOKENS, tiny_bert_config, word_tokenizer


PARAGRAPHS = [
    (
        "Paris is the capital of France. The city stands on the river Seine.",
        [("Which river runs through the city?", "Seine"), ("What is the capital of France?", "Paris")],
    ),
    (
        "The Rhine flows from the Alps to the North Sea. It passes Basel and Cologne.",
        [("Where does the Rhine end?", "the North Sea"), ("Which city does the Rhine pass first?", "Basel")],
    ),
    (
        "Marie Curie won two Nobel prizes. She was born in Warsaw in 1867.",
        [("Where was Marie Curie born?", "Warsaw"), ("How many Nobel prizes did Curie win?", "two")],
    ),
]


def squad_json() -> dict:
    """The paragraphs above in the official nested SQuAD v1.1 layout."""
    data, qid = [], 0
    for index, (context, questions) in enumerate(PARAGRAPHS):
        qas = []
        for question, answer in questions:
            qas.append(
                {
                    "id": f"q{qid}",
                    "question": question,
                    "answers": [{"text": answer, "answer_start": context.index(answer)}],
                }
            )
            qid += 1
        data.append({"title": f"article {index}", "paragraphs": [{"context": context, "qas": qas}]})
    return {"version": "1.1", "data": data}


def write_squad_file(path: Path) -> Path:
    path.write_text(json.dumps(squad_json()))
    return path


def write_tiny_qa_model(directory: Path) -> Path:
    """Saves a tiny BERT QA model and a word-level BERT tokenizer built from the fixture's words."""
    words = set()
    for context, questions in PARAGRAPHS:
        for text in [context, *(q for q, _ in questions)]:
            words.update(text.lower().replace(".", " . ").replace("?", " ? ").split())
    word_tokenizer(directory, sorted(words)).save_pretrained(directory)
    torch.manual_seed(0)
    BertForQuestionAnswering(tiny_bert_config(len(SPECIAL_TOKENS) + len(words))).save_pretrained(directory)
    return directory


def squad_json_with_whitespace_answers() -> dict:
    """Like the official files: answers whose text differs from the context only by whitespace (a doubled space, a
    newline, an `answer_start` one character late), next to an exact one."""
    context = "The Rhine flows from the Alps to the  North\nSea. It passes Basel  and Cologne."
    qas = [
        {
            "id": "w0",
            "question": "Where does the Rhine end?",
            "answers": [{"text": "the North Sea", "answer_start": 33}],
        },
        {"id": "w1", "question": "Which cities?", "answers": [{"text": "Basel and Cologne", "answer_start": 60}]},
        {"id": "w2", "question": "From where?", "answers": [{"text": "the Alps", "answer_start": 21}]},
    ]
    return {"version": "1.1", "data": [{"title": "rhine", "paragraphs": [{"context": context, "qas": qas}]}]}


def squad_v2_json() -> dict:
    """SQuAD v2: an unanswerable question (`is_impossible`, no answers) next to an answerable one."""
    data = squad_json()
    data["version"] = "v2.0"
    data["data"][0]["paragraphs"][0]["qas"].append(
        {"id": "impossible", "question": "Who wrote the city?", "answers": [], "is_impossible": True}
    )
    return data
