"""Task heads on top of our encoder (`pretrain.model.BertModel`), with the module names of
transformers' `BertForSequenceClassification` / `BertForTokenClassification` /
`BertForQuestionAnswering` (`bert.*` + `classifier.*` or `qa_outputs.*`), so a saved
fine-tuned directory loads in transformers as is, and ours loads theirs. Which head a task
uses is the task's choice (`finetune/tasks/`).

Every head's loss is a mean over its loss terms (examples; for token labelling the labelled
tokens). `forward(..., loss_reduction="sum")` returns their sum instead and `loss_units(batch)`
counts them, so that the training loop can divide a share of a batch by the term count of the
whole batch: several processes and accumulated micro-batches then give exactly the loss and
gradient of one step on the whole batch (`finetune/train.py`).

The encoder runs unpadded (`pretrain/unpad.py`: the dense layers see only the real tokens)
wherever no output at a padding position is returned: always for the pooled head (whose last
layer computes the [CLS] rows only) and the span head
(span logits at padding are masked anyway), and for token labelling when labels are given
(training; its logits at padding are then those of a zero hidden state). Token logits without
labels keep the padded layout, so every position equals transformers'.

`layout` (optional, every head): the batch's `pretrain.unpad.TokenLayout`, built by the caller
where the mask is still on the host (`finetune/train.py` does, for training and prediction) and
moved with the batch; without it the encoder builds it from the mask, which on a GPU waits for
the device several times per micro-batch. A batch whose [CLS] column holds padding (left padding,
a row without tokens) runs the pooled head padded, as BERT's pooler reads position 0."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.model import BertConfig, BertModel
from pretrain.unpad import TokenLayout


def _dropout(config: BertConfig) -> nn.Dropout:
    p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
    return nn.Dropout(p)


def _init_linear(linear: nn.Linear, std: float) -> None:
    # the same N(0, initializer_range) / zero-bias init the encoder uses (HF's BERT init)
    with torch.no_grad():
        linear.weight.normal_(0.0, std)
        linear.bias.zero_()


class BertForSequenceClassification(nn.Module):
    """Pooled [CLS] vector -> dropout -> one linear layer. `num_labels == 1` with
    `regression=True` is a regression head trained with MSE (STS-B style)."""

    def __init__(self, config: BertConfig, num_labels: int, regression: bool = False):
        super().__init__()
        self.config, self.num_labels, self.regression = config, num_labels, regression
        self.bert = BertModel(config, add_pooling_layer=True)
        self.dropout = _dropout(config)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        _init_linear(self.classifier, config.initializer_range)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, labels=None, loss_reduction="mean",
                layout: TokenLayout | None = None):
        # Only the [CLS] rows leave the last layer (its attention output and feed-forward skip
        # every other token), as pretraining's NSP head does.
        batch, seq = input_ids.shape
        cls_rows = torch.arange(0, batch * seq, seq, device=input_ids.device)
        hidden = self.bert(input_ids, token_type_ids, attention_mask, output_rows=cls_rows, unpad=True,
                           layout=layout).last_hidden_state
        pooled = self.bert.pooler(hidden[:, None])
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            if self.regression:
                loss = F.mse_loss(logits.squeeze(-1), labels.float(), reduction=loss_reduction)
            else:
                loss = F.cross_entropy(logits, labels, reduction=loss_reduction)
        return loss, logits

    @staticmethod
    def loss_units(batch: dict) -> int:
        """The loss is a mean over examples."""
        return len(batch["input_ids"])


class BertForTokenClassification(nn.Module):
    """A linear layer on every token's last hidden state; labels -100 are ignored (sub-tokens
    after a word's first, special tokens, padding)."""

    def __init__(self, config: BertConfig, num_labels: int):
        super().__init__()
        self.config, self.num_labels = config, num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        self.dropout = _dropout(config)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        _init_linear(self.classifier, config.initializer_range)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, labels=None, loss_reduction="mean",
                layout: TokenLayout | None = None):
        train = labels is not None  # without labels every position's logits are returned: padded
        hidden = self.bert(input_ids, token_type_ids, attention_mask, unpad=train,
                           layout=layout if train else None).last_hidden_state
        logits = self.classifier(self.dropout(hidden))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, self.num_labels), labels.reshape(-1), ignore_index=-100,
                                   reduction=loss_reduction)
        return loss, logits

    @staticmethod
    def loss_units(batch: dict) -> int:
        """The loss is a mean over labelled tokens: sentences differ in how many they have, so a
        share of a batch weighs by its tokens, not by its sentences."""
        return int((batch["labels"] != -100).sum())


class BertForQuestionAnswering(nn.Module):
    """Start/end span logits from one linear layer (2 outputs) on every token; no-answer is
    the span (0, 0) at [CLS], as in the original BERT SQuAD v2.0 recipe."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        _init_linear(self.qa_outputs, config.initializer_range)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None,
                start_positions=None, end_positions=None, loss_reduction="mean", layout: TokenLayout | None = None):
        hidden = self.bert(input_ids, token_type_ids, attention_mask, unpad=True, layout=layout).last_hidden_state
        start, end = self.qa_outputs(hidden).unbind(-1)
        if attention_mask is not None:
            # padding must never be picked as a span boundary
            start = start.masked_fill(attention_mask == 0, torch.finfo(start.dtype).min)
            end = end.masked_fill(attention_mask == 0, torch.finfo(end.dtype).min)
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = (F.cross_entropy(start, start_positions, reduction=loss_reduction)
                    + F.cross_entropy(end, end_positions, reduction=loss_reduction)) / 2
        return loss, (start, end)

    @staticmethod
    def loss_units(batch: dict) -> int:
        """The loss is a mean over examples (windows)."""
        return len(batch["input_ids"])

