"""Downstream use of a pretrained BERT: fine-tuning (classify, pair, token, qa) and frozen features; `python -m finetune --help`."""
