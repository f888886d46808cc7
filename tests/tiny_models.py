"""Tiny models of every supported architecture, built from configs (no hub)."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertModel,
    DistilBertConfig,
    DistilBertForQuestionAnswering,
    DistilBertForSequenceClassification,
    ElectraConfig,
    ElectraForQuestionAnswering,
    ElectraForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaForQuestionAnswering,
    ViTConfig,
    ViTForImageClassification,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)


ENCODER_KWARGS = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
DECODER_KWARGS = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=37,
    max_position_embeddings=64,
)
DISTILBERT_KWARGS = dict(
    vocab_size=99,
    dim=32,
    n_layers=3,
    n_heads=4,
    hidden_dim=37,
    max_position_embeddings=64,
    dropout=0.0,
    attention_dropout=0.0,
)


FROM_PRETRAINED_SIZE_ERROR = r"size mismatch|ignore_mismatched_sizes"
"""What plain `from_pretrained` raises on a pruned folder: transformers 4's `size mismatch ...`, transformers 5's
"You set `ignore_mismatched_sizes` to `False` ..." after its load report."""


def _encoder(config_class, model_class, **extra):
    return model_class(config_class(**ENCODER_KWARGS, **extra))


TINY_MODEL_FACTORIES = {
    "bert": lambda: _encoder(BertConfig, BertForSequenceClassification, num_labels=3),
    "bert-qa": lambda: _encoder(BertConfig, BertForQuestionAnswering),
    "bert-base-model": lambda: _encoder(BertConfig, BertModel),
    "roberta": lambda: _encoder(RobertaConfig, RobertaForQuestionAnswering, pad_token_id=1),
    "roberta-mlm": lambda: _encoder(RobertaConfig, RobertaForMaskedLM, pad_token_id=1),
    "xlm-roberta": lambda: _encoder(XLMRobertaConfig, XLMRobertaForSequenceClassification, pad_token_id=1),
    "electra": lambda: _encoder(ElectraConfig, ElectraForSequenceClassification, embedding_size=16),
    "electra-qa": lambda: _encoder(ElectraConfig, ElectraForQuestionAnswering, embedding_size=16),
    "distilbert": lambda: DistilBertForSequenceClassification(DistilBertConfig(**DISTILBERT_KWARGS)),
    "distilbert-qa": lambda: DistilBertForQuestionAnswering(DistilBertConfig(**DISTILBERT_KWARGS)),
    "vit": lambda: ViTForImageClassification(
        ViTConfig(
            image_size=16,
            patch_size=4,
            num_channels=3,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=37,
            num_labels=5,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    ),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**DECODER_KWARGS)),
    "llama-cls": lambda: LlamaForSequenceClassification(LlamaConfig(**DECODER_KWARGS, num_labels=2, pad_token_id=0)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**DECODER_KWARGS)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**DECODER_KWARGS)),
}


def tiny_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny randomly initialised model of the given kind, in eval mode."""
    torch.manual_seed(seed)
    return TINY_MODEL_FACTORIES[name]().eval()


def tiny_inputs(model: torch.nn.Module, batch_size: int = 2, seq_length: int = 7, seed: int = 0) -> dict:
    """Inputs for `model`: token ids with a padded tail for text models, pixels for ViT."""
    generator = torch.Generator().manual_seed(seed)
    if model.main_input_name == "pixel_values":
        size = model.config.image_size
        return {"pixel_values": torch.randn(batch_size, model.config.num_channels, size, size, generator=generator)}
    input_ids = torch.randint(3, model.config.vocab_size, (batch_size, seq_length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -2:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}
