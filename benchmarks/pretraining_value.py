"""Does our pretrained encoder fine-tune better than the same model from random init?

Builds the pretrained model's shape from random init with our own model code (pretrain.model's
BertForPreTraining + init_weights() after torch.manual_seed, the route pretrain/trainer.py's
build_model takes, so with the run's seed it is the exact step-0 model of that run), fine-tunes
both on every built-in task of `finetune` over seeds x learning rates, picks for each (task, init)
the lr with the best mean over seeds (the same rule for both inits), and prints the sweep, then
one table: pretrained vs random init, whether the gain exceeds the seed-to-seed spread, and the strongest
simple heuristic of finetune.baselines on the same split (what either init has to beat to have learnt the task).
Everything goes to OUT/pretraining_value.json (runs under OUT/runs/INIT/TASK/lr_LR/).

    .venv/bin/python benchmarks/pretraining_value.py --pretrained demo_out/hf --output-dir pv_out
    .venv/bin/python benchmarks/pretraining_value.py --run demo_out/run --output-dir pv_out \\
        --tasks pang-lee --seeds 1 2 --lrs 5e-4 --max-train-examples 500 --threads 2
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from data_prep.atomic import atomic_json  # noqa: E402
from finetune.baselines import strongest_builtin  # noqa: E402
from finetune.datasets import CLOZE_QA_WINDOWS, write_builtin  # noqa: E402
from finetune.runner import FinetuneArgs, run  # noqa: E402
from finetune.train import TrainConfig  # noqa: E402

# built-in dataset -> (finetune task, metric the lr is chosen on, other metrics reported, epochs).
# WNUT-16 gets 10 epochs: in 3 (180 steps) neither init tags a single entity of the test set.
TASKS = {"pang-lee": ("classify", "accuracy", (), 3.0), "wnut16": ("token", "f1", (), 10.0),
         "wiki-next-sentence": ("pair", "accuracy", (), 3.0), "wiki-cloze": ("qa", "f1", ("exact_match",), 3.0)}
INITS = ("pretrained", "random_init")
QA_WINDOWS = CLOZE_QA_WINDOWS  # the built-in cloze's windows (finetune's QA default is 384/128)
SELECTION = "per (task, init): the lr with the best mean over seeds of the task's metric (same rule for both inits)"


def default_init_seed() -> int:
    from pretrain.config import TrainConfig as PretrainConfig

    return PretrainConfig().seed


def random_init_dir(pretrained_dir: str, out_dir: str, seed: int | None = None) -> str:
    """The pretrained dir's model shape from our init (as the trainer starts a run), saved as an HF dir."""
    from pretrain.hf_io import save_hf_dir
    from pretrain.model import BertConfig, BertForPreTraining

    config = BertConfig.from_json_file(os.path.join(pretrained_dir, "config.json"))
    torch.manual_seed(default_init_seed() if seed is None else seed)
    model = BertForPreTraining(config)
    model.init_weights()
    save_hf_dir(model, config, out_dir, vocab_file=os.path.join(pretrained_dir, "vocab.txt"))
    return out_dir


def run_seed(run_dir: str) -> int:
    """The seed a pretraining run initialised its model with (read from its checkpoint)."""
    from pretrain import checkpoint as ckpt

    cfg = ckpt.read_state(*ckpt.resolve(run_dir)).get("config", {}).get("cfg", {})
    if cfg.get("init_from"):
        logging.warning("run %s started from %s, not from random init", run_dir, cfg["init_from"])
    return cfg.get("seed", default_init_seed())


def export_run(run_dir: str, out_dir: str) -> tuple[str, int]:
    """Export a pretraining checkpoint to OUT/pretrained; returns (dir, the run's init seed)."""
    from pretrain.export_hf import export

    return export(run_dir, out_dir), run_seed(run_dir)


def check_hf_loads(path: str) -> None:
    """transformers' BertForPreTraining loads the dir with no missing/unexpected/mismatched keys."""
    from transformers import BertForPreTraining as HFBertForPreTraining
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    _, info = HFBertForPreTraining.from_pretrained(path, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k != "error_msgs" and v} | ({"error_msgs": info["error_msgs"]}
                                                                         if info.get("error_msgs") else {})
    if bad:
        raise RuntimeError(f"transformers' BertForPreTraining does not load {path} cleanly: {bad}")


def _lr_key(lr: float) -> str:
    return f"{lr:g}"


def compare(pretrained_dir: str, random_dir: str, tasks, seeds, lrs, output_dir: str, epochs: float | None = None,
            max_train_examples: int | None = None, max_eval_examples: int | None = None,
            threads: int | None = None, verbose: bool = True) -> dict:
    """Fine-tune both inits on every task x lr x seed; the result pretraining_value.json holds."""
    t_all = time.perf_counter()
    out = {"tasks": {}, "timings": []}
    for task in tasks:
        ft_task, metric, others, task_epochs = TASKS[task]
        entry = {"metric": metric, "finetune_task": ft_task, "epochs": task_epochs if epochs is None else epochs}
        # the strongest simple heuristic of finetune.baselines on the same split (fit on the same training examples)
        files = write_builtin(task, ft_task, os.path.join(output_dir, "heuristic", task))
        h_name, h_score = strongest_builtin(task, *files, max_train_examples, max_eval_examples)
        entry["heuristic"] = {"name": h_name, "score": h_score}
        if verbose:
            print(f"  {task:<19} heuristic  {h_name}: {metric} {h_score:.4g}", flush=True)
        for init, model_dir in zip(INITS, (pretrained_dir, random_dir)):
            sweep = {}
            for lr in lrs:
                train = TrainConfig(learning_rate=lr, epochs=entry["epochs"])
                args = FinetuneArgs(task=ft_task, model=model_dir, train_file=None, eval_file=None, dataset=task,
                                    output_dir=os.path.join(output_dir, "runs", init, task, f"lr_{_lr_key(lr)}"),
                                    seeds=list(seeds), train=train, max_train_examples=max_train_examples,
                                    max_eval_examples=max_eval_examples, save_model=False, threads=threads,
                                    **(QA_WINDOWS if ft_task == "qa" else {}))
                t = time.perf_counter()
                s = run(args)
                wall = time.perf_counter() - t
                sweep[_lr_key(lr)] = {"mean": s["mean"][metric], "std": s["std"][metric],
                                      "per_seed": [r[metric] for r in s["runs"]],
                                      **{k: {"mean": s["mean"][k], "std": s["std"][k]} for k in others},
                                      "wall_s": wall, "train_s_per_seed": [r["train_seconds"] for r in s["runs"]]}
                out["timings"].append({"task": task, "init": init, "lr": lr, "wall_s": wall, "seeds": len(seeds)})
                if verbose:
                    print(f"  {task:<19} {init:<11} lr {_lr_key(lr):<7} {metric} {s['mean'][metric]:.4g} "
                          f"± {s['std'][metric]:.2g}  ({wall:.1f} s for {len(seeds)} seed(s), "
                          f"{wall / len(seeds):.1f} s/seed)", flush=True)
            best = max(sweep, key=lambda k: sweep[k]["mean"])  # ties: the first (smallest) lr listed
            entry[init] = {"lr": float(best), "mean": sweep[best]["mean"], "std": sweep[best]["std"],
                           **{k: sweep[best][k] for k in others}, "sweep": sweep}
        p, r = entry["pretrained"], entry["random_init"]
        entry["gain"] = p["mean"] - r["mean"]
        entry["beats_by_more_than_spread"] = bool(entry["gain"] > max(p["std"], r["std"]))
        out["tasks"][task] = entry
    out["total_wall_s"] = time.perf_counter() - t_all
    return out


def _grid(head: list, rows: list) -> str:
    w = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda cells: " | ".join(str(c).ljust(n) for c, n in zip(cells, w)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), "-+-".join("-" * n for n in w), *map(fmt, rows)])


def format_sweep(result: dict) -> str:
    rows = [[task, e["metric"], lr, *(f"{s['mean']:.4g} ± {s['std']:.2g} {[round(v, 4) for v in s['per_seed']]}"
                                      for s in (e[i]["sweep"][lr] for i in INITS))]
            for task, e in result["tasks"].items() for lr in e["pretrained"]["sweep"]]
    head = ["task", "metric", "lr", "pretrained mean ± std [per seed]", "random init mean ± std [per seed]"]
    return _grid(head, rows)


def format_table(result: dict) -> str:
    head = ["task", "metric", "pretrained mean ± std (best lr)", "random init mean ± std (best lr)",
            "gain (pretrained - random)", "beats by > spread", "strongest simple heuristic"]
    rows = []
    for task, e in result["tasks"].items():
        p, r = e["pretrained"], e["random_init"]
        cells = [f"{x['mean']:.4g} ± {x['std']:.2g} (lr {_lr_key(x['lr'])})" for x in (p, r)]
        h = e.get("heuristic")  # absent in a pretraining_value.json written before it was measured
        rows.append([task, e["metric"], *cells, f"{e['gain']:+.4g}", "yes" if e["beats_by_more_than_spread"] else "no",
                     f"{h['score']:.4g} ({h['name']})" if h else "-"])
        for k in (k for k in p if isinstance(p[k], dict) and "mean" in p[k]):  # e.g. QA exact, at f1's lr
            g = p[k]["mean"] - r[k]["mean"]
            rows.append(["", f"{k} (same lr)", *(f"{x[k]['mean']:.4g} ± {x[k]['std']:.2g}" for x in (p, r)),
                         f"{g:+.4g}", "yes" if g > max(p[k]["std"], r[k]["std"]) else "no", ""])
    return _grid(head, rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", help="HF BertForPreTraining dir (python -m pretrain.export_hf RUN/latest DIR)")
    p.add_argument("--run", help="pretraining save_dir or checkpoint: exported to OUT/pretrained first, unless "
                                 "--pretrained names its export (then the run only gives the init seed)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--lrs", type=float, nargs="+", default=[5e-4, 1e-3, 2e-3])
    p.add_argument("--epochs", type=float, default=None,
                   help="fine-tuning epochs for every task (default: per task, " +
                   ", ".join(f"{k} {v[3]:g}" for k, v in TASKS.items()) + ")")
    p.add_argument("--init-seed", type=int, default=None,
                   help="seed of the random init (default: the run's seed with --run, else pretraining's default)")
    p.add_argument("--max-train-examples", type=int, default=None)
    p.add_argument("--max-eval-examples", type=int, default=None)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--table-only", action="store_true", help="print only the settings and the final table")
    p.add_argument("--log-level", default="WARNING")
    a = p.parse_args(argv)
    if not (a.pretrained or a.run):
        p.error("give --pretrained DIR, --run RUN_DIR, or both (an existing export of the run)")
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.makedirs(a.output_dir, exist_ok=True)
    pretrained, seed = a.pretrained, default_init_seed()
    if a.run and a.pretrained:
        seed = run_seed(a.run)
    elif a.run:
        pretrained, seed = export_run(a.run, os.path.join(a.output_dir, "pretrained"))
    init_seed = a.init_seed if a.init_seed is not None else seed
    random_dir = random_init_dir(pretrained, os.path.join(a.output_dir, "random_init"), init_seed)
    for d in (pretrained, random_dir):
        check_hf_loads(d)
    print(f"pretrained: {pretrained} | random init: {random_dir} (seed {init_seed}); both load in transformers' "
          f"BertForPreTraining\ntasks {a.tasks}, seeds {a.seeds}, lrs {a.lrs}, "
          f"epochs {a.epochs if a.epochs is not None else {t: TASKS[t][3] for t in a.tasks}}, "
          f"{a.threads} threads", flush=True)
    result = compare(pretrained, random_dir, a.tasks, a.seeds, a.lrs, a.output_dir, a.epochs,
                     a.max_train_examples, a.max_eval_examples, a.threads, verbose=not a.table_only)
    result["settings"] = {"pretrained": pretrained, "random_init": random_dir, "init_seed": init_seed,
                          "run": a.run, "seeds": a.seeds, "lrs": a.lrs, "epochs": {t: result["tasks"][t]["epochs"] for t in a.tasks},
                          "max_train_examples": a.max_train_examples, "max_eval_examples": a.max_eval_examples,
                          "threads": a.threads, "lr_selection": SELECTION, "torch": torch.__version__}
    atomic_json(os.path.join(a.output_dir, "pretraining_value.json"), result, sort_keys=False)
    if not a.table_only:
        print(f"\nfull sweep:\n{format_sweep(result)}\n")
    print(f"lr selection: {SELECTION}.")
    if len(a.seeds) < 2:
        print("one seed: std is 0, so 'beats by > spread' only says gain > 0.")
    print(format_table(result))
    print(f"\ntotal fine-tuning wall time {result['total_wall_s']:.1f} s; "
          f"written {os.path.join(a.output_dir, 'pretraining_value.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
