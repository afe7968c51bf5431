"""Token labelling (`--task token`, NER): CoNLL-style files (IOB2; IOB1, BIOES and BILOU are
converted to IOB2 on read), each word's label on its first WordPiece, a linear layer on every
token, entity-level P/R/F1 (the seqeval package)."""
from __future__ import annotations

import logging
import os

import numpy as np

from data_prep.atomic import atomic_write

from ..metrics import entity_scores
from ..modeling import BertForTokenClassification
from ..readers import TaggedSentence, limit, prefixed, read_conll
from .base import TEST_PREFIX, Task, TaskData, TestData, label_config

log = logging.getLogger(__name__)


def encode_tagged(sentences: list[TaggedSentence], tokenizer, max_length: int, label2id: dict,
                  source: str, tagged: bool = True) -> list[dict]:
    """WordPiece over pre-split words; each word's label goes on its first sub-token and the
    other sub-tokens get -100 (ignored), the original BERT NER recipe. `_first` keeps, per
    word, the position of its first sub-token (-1 when truncated away or empty). `tagged=False`:
    a file to predict, whose every word lost to truncation is reported (not only entity words)."""
    enc = tokenizer([s.tokens for s in sentences], is_split_into_words=True, truncation=True,
                    max_length=max_length)
    feats, lost, unseen = [], 0, set()
    for i, s in enumerate(sentences):
        word_ids = enc.word_ids(i)
        first = [-1] * len(s.tokens)
        labels = []
        prev = None
        for pos, w in enumerate(word_ids):
            if w is None or w == prev:
                labels.append(-100)
            else:
                tag = s.tags[w]
                if tag not in label2id:
                    # an entity type never seen in training: scored as gold, but no loss target
                    unseen.add(tag)
                labels.append(label2id.get(tag, -100))
                first[w] = pos
            prev = w
        lost += sum(1 for j, p in enumerate(first) if p < 0 and (s.tags[j] != "O" or not tagged))
        feats.append({"input_ids": enc["input_ids"][i], "token_type_ids": enc["token_type_ids"][i],
                      "attention_mask": enc["attention_mask"][i], "labels": labels, "_first": first})
    if unseen:
        log.warning("%s: tags %s do not occur in training; they can never be predicted", source, sorted(unseen))
    if lost:
        log.warning("%s: %d %s fall beyond --max-seq-length %d (or have no sub-tokens) and "
                    "are predicted as O", source, lost, "tagged words" if tagged else "words", max_length)
    return feats


def evaluate_tagged(outputs, features, sentences: list[TaggedSentence], labels: list[str]
                    ) -> tuple[dict, list[list[str]]]:
    preds = []
    for out, f in zip(outputs, features):
        ids = np.argmax(out, axis=-1)
        preds.append([labels[int(ids[p])] if p >= 0 else "O" for p in f["_first"]])
    return entity_scores([s.tags for s in sentences], preds), preds


class TokenTask(Task):
    name = "token"
    architecture = "BertForTokenClassification"

    def read(self, a, train_file, eval_file, tokenizer) -> TaskData:
        train_skips, eval_skips = {}, {}
        train_ex = limit(read_conll(train_file, train_skips), a.max_train_examples)
        eval_ex = limit(read_conll(eval_file, eval_skips), a.max_eval_examples)
        types = {t[2:] for s in train_ex for t in s.tags if t != "O"}
        # "O" first, then B-/I- of each entity type (both, even if one never occurs in training)
        labels = ["O"] + [f"{p}-{t}" for t in sorted(types) for p in "BI"]
        l2i = {l: i for i, l in enumerate(labels)}
        L = a.max_seq_length
        return TaskData(train_ex, eval_ex, encode_tagged(train_ex, tokenizer, L, l2i, train_file),
                        encode_tagged(eval_ex, tokenizer, L, l2i, eval_file), labels,
                        skipped=prefixed(train=train_skips, eval=eval_skips))

    def build_head(self, config, num_labels=2, regression=False):
        return BertForTokenClassification(config, num_labels)

    def evaluate(self, a, data, outputs):
        return evaluate_tagged(outputs, data.eval_features, data.eval_examples, data.labels)

    def save_predictions(self, data, preds, out_dir):
        with atomic_write(os.path.join(out_dir, "eval_predictions.conll"), "w", encoding="utf-8") as f:
            for s, p in zip(data.eval_examples, preds):
                f.writelines(f"{t}\t{g}\t{q}\n" for t, g, q in zip(s.tokens, s.tags, p))
                f.write("\n")

    def hf_config(self, labels, regression=False, data=None):
        return {**super().hf_config(labels, regression, data), **label_config(labels)}

    def read_labelled(self, a, path, tokenizer, labels):
        ex = limit(read_conll(path), a.max_eval_examples)
        return TaskData([], ex, [], encode_tagged(ex, tokenizer, a.max_seq_length,
                                                  {l: i for i, l in enumerate(labels)}, path), labels)

    def read_unlabelled(self, a, path, tokenizer):
        """A CoNLL file to tag: the token in the first column; any further columns (tags
        included) are ignored."""
        sents = read_conll(path, tagged=False)
        sents = limit(sents, a.max_test_examples)
        return TestData(path, sents, encode_tagged(sents, tokenizer, a.max_seq_length, {"O": 0}, path,
                                                  tagged=False))

    def predict_unlabelled(self, a, test, outputs, labels):
        return evaluate_tagged(outputs, test.features, test.examples, labels)[1]

    def save_test_predictions(self, test, preds, out_dir):
        """CoNLL: token TAB predicted tag, a blank line after each sentence."""
        with atomic_write(os.path.join(out_dir, f"{TEST_PREFIX}predictions.conll"), "w", encoding="utf-8") as f:
            for s, p in zip(test.examples, preds):
                f.writelines(f"{t}\t{q}\n" for t, q in zip(s.tokens, p))
                f.write("\n")


TOKEN = TokenTask()
