"""`python -m data_prep`: parse, validate, build the config, run, print the report."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from .errors import DataPrepError

log = logging.getLogger("data_prep")

_MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="Tokenize raw text into a Megatron indexed corpus (1 sequence = 1 sentence) plus "
                    "precomputed BERT NSP pair indexes, with a checksummed manifest.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--input", nargs="+", metavar="PATH",
                    help="text files (documents separated by blank lines), JSON lines (.jsonl/.json, one "
                         "document per line in --json-key), .gz of either, or directories of them")
    io.add_argument("--embedded", nargs="*", metavar="CORPUS", default=None,
                    help="use corpora installed by scripts/setup.sh: wiki (the default with no name: 10,033 "
                         "Wikipedia extracts; the CPU recipe's), movie-reviews (1,500 full movie reviews), tweets "
                         "(~37k tweets); any of them together. With the bert-base-uncased vocab, or a vocab trained on "
                         "them with --train-wordpiece-vocab-size / --train-spm-vocab-size")
    io.add_argument("--output-dir", required=True, help="directory for corpus.bin/.idx, pairs_*.bin, manifest.json")
    io.add_argument("--input-format", default="auto", choices=["auto", "text", "jsonl"],
                    help="auto: .jsonl/.json/.ndjson (optionally .gz) are JSON lines, anything else text")
    io.add_argument("--json-key", default="text", help="field holding the document text in JSON lines")
    io.add_argument("--cache-dir", default=None, help="where --embedded keeps its JSON-lines conversion")
    tk = p.add_argument_group("tokenizer")
    tk.add_argument("--vocab", help="WordPiece vocab.txt, or a sentencepiece .model (or train one, below)")
    lc = tk.add_mutually_exclusive_group()
    lc.add_argument("--lower-case", dest="lower_case", action="store_true", default=None,
                    help="lower-case (and strip accents) before WordPiece; default for vocab.txt and "
                         "--train-wordpiece-vocab-size")
    lc.add_argument("--no-lower-case", dest="lower_case", action="store_false",
                    help="keep case (cased vocabularies); default for sentencepiece")
    tk.add_argument("--train-wordpiece-vocab-size", type=int, default=0, metavar="N",
                    help="train a BERT WordPiece vocab of N entries on the inputs (HF tokenizers; ids 0-4 = [PAD] "
                         "[UNK] [CLS] [SEP] [MASK]; deterministic), written as vocab.txt and used as --vocab would be")
    tk.add_argument("--train-spm-vocab-size", type=int, default=0, metavar="N",
                    help="train a new sentencepiece model of this size on the inputs (written as spm.model)")
    tk.add_argument("--spm-model-type", default="unigram", choices=["unigram", "bpe"])
    tk.add_argument("--tokenizer-train-sentences", "--spm-train-sentences", type=int, default=1_000_000,
                    dest="tokenizer_train_sentences", metavar="N",
                    help="train either tokenizer on at most this many sentences from the start of the inputs")
    tk.add_argument("--splitter", default="blingfire", choices=["blingfire", "pysbd", "syntok", "lines"],
                    help="sentence splitter; 'lines' treats every input line as one sentence")
    tk.add_argument("--max-sentence-tokens", type=int, default=512,
                    help="longer sentences are cut into pieces of this many tokens (counted in the manifest)")
    nsp = p.add_argument_group("NSP pairs")
    nsp.add_argument("--seq-length", type=int, action="append", dest="seq_lengths", metavar="L",
                     help="build a pair index for this sequence length; repeat for several (default 128)")
    nsp.add_argument("--short-seq-prob", type=float, default=0.1)
    nsp.add_argument("--dupe-factor", type=int, default=1,
                     help="rounds of pair building with different random choices (only the pair index grows)")
    nsp.add_argument("--valid-fraction", type=float, default=0.01,
                     help="fraction of documents held out (seeded, by document) for pairs_<L>_valid.bin")
    nsp.add_argument("--seed", type=int, default=1234)
    run = p.add_argument_group("execution")
    run.add_argument("--workers", type=int, default=1, help="tokenizer processes on this node")
    run.add_argument("--docs-per-shard", type=int, default=1000,
                     help="documents per work unit (the unit of parallelism and of resume), at most")
    run.add_argument("--shard-bytes", type=int, default=8 << 20, metavar="N",
                     help="a work unit also ends at N bytes of text: a worker's memory is ~25x this while it "
                          "tokenizes, plus ~0.4 GB; lower it if workers are killed for memory")
    run.add_argument("--part-bytes", type=int, default=256 << 20, metavar="N",
                     help="input files larger than N bytes (not .gz) are cut at document boundaries into "
                          "parts of about N bytes, spread over MPI ranks")
    io.add_argument("--max-document-bytes", type=int, default=1 << 20, metavar="N",
                    help="documents longer than N bytes (e.g. a .txt without blank lines) become pseudo-documents "
                         "cut between lines, counted in the manifest; 0 = never")
    run.add_argument("--mpi", default="auto", choices=["auto", "on", "off"],
                     help="share shards across MPI ranks (auto: when started by mpirun)")
    run.add_argument("--keep-work", action="store_true", help="keep the .work shard directory after success")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    run.add_argument("-v", "--verbose", action="store_true")
    return p


class _MPIComm:
    def __init__(self):
        try:
            from mpi4py import MPI
        except ImportError as e:
            raise DataPrepError("--mpi on: mpi4py is not importable (pip install mpi4py; needs an MPI library)") from e
        self._c = MPI.COMM_WORLD
        self.rank, self.size = self._c.Get_rank(), self._c.Get_size()

    def barrier(self):
        # OpenMPI's Barrier spins a core at 100% while waiting; ranks that finish their shards early
        # would steal CPU from the ones still tokenizing (and from rank 0's merge). Poll and sleep.
        import time

        req = self._c.Ibarrier()
        while not req.Test():
            time.sleep(0.05)

    def bcast(self, obj, root=0):
        return self._c.bcast(obj, root=root)

    def abort(self, code: int):
        # One failed rank would leave the others waiting in a barrier forever: stop the whole job.
        self._c.Abort(code)


def make_comm(mode: str):
    if mode == "off" or (mode == "auto" and not any(v in os.environ for v in _MPI_ENV)):
        return None
    comm = _MPIComm()
    return comm if comm.size > 1 or mode == "on" else None


def config_from_args(args):
    from .pipeline import PrepConfig

    inputs, vocab = args.input, args.vocab
    if args.embedded is not None:
        from .embedded import embedded_corpora_jsonl, embedded_vocab

        if inputs:
            raise DataPrepError("--embedded and --input exclude each other: drop one")
        inputs = embedded_corpora_jsonl(args.embedded or ["wiki"], args.cache_dir)
        if not vocab and not args.train_spm_vocab_size and not args.train_wordpiece_vocab_size:
            vocab = embedded_vocab()
    if not inputs:
        raise DataPrepError("--input: give at least one file or directory (or --embedded)")
    return PrepConfig(
        inputs=inputs, output_dir=args.output_dir, vocab=vocab, seq_lengths=args.seq_lengths or [128],
        seed=args.seed, valid_fraction=args.valid_fraction, dupe_factor=args.dupe_factor,
        short_seq_prob=args.short_seq_prob, lower_case=args.lower_case, splitter=args.splitter,
        input_format=args.input_format, json_key=args.json_key, max_sentence_tokens=args.max_sentence_tokens,
        docs_per_shard=args.docs_per_shard, shard_bytes=args.shard_bytes, part_bytes=args.part_bytes,
        max_document_bytes=args.max_document_bytes, train_spm_vocab_size=args.train_spm_vocab_size,
        spm_model_type=args.spm_model_type, train_wordpiece_vocab_size=args.train_wordpiece_vocab_size,
        tokenizer_train_sentences=args.tokenizer_train_sentences,
        workers=args.workers, keep_work=args.keep_work, progress=args.progress,
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    comm = None
    try:
        comm = make_comm(args.mpi)
        rank = comm.rank if comm else 0
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else (logging.INFO if rank == 0 else logging.WARNING),
            format=("" if rank == 0 else f"[rank {rank}] ") + "%(levelname)s %(name)s: %(message)s",
        )
        # megatron-core logs every index it opens at INFO, and warns on import that it has no GPU
        # fusions (irrelevant to data prep); both would drown the report.
        logging.getLogger("megatron").setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        from .pipeline import format_report, run

        cfg = config_from_args(args)
        manifest = run(cfg, comm)
    except DataPrepError as e:
        print(f"data_prep: error: {e}", file=sys.stderr)
        if comm is not None and comm.size > 1:
            sys.stderr.flush()
            comm.abort(2)
        return 2
    except Exception:
        if comm is not None and comm.size > 1:
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
            comm.abort(1)
        raise
    if manifest is not None:
        print(format_report(manifest))
        print(f"wrote {os.path.join(args.output_dir, 'manifest.json')}")
    return 0
