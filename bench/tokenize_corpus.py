"""How fast the trainer prepares a tokenised corpus, next to the tokenizer's own batch encoding.

    python bench/tokenize_corpus.py                       # the embedded corpus, the test suite's BPE tokenizer
    python bench/tokenize_corpus.py --tokenizer DIR --files 200 --workers 1 2 --rounds 5

Two ways to turn the same documents (the first ``--files`` files of the embedded corpus, one document
each) into tokens, timed in interleaved rounds (bench/timing.py):

  tokenizer(batch)      ``tokenizer(list_of_documents)["input_ids"]`` on texts already in memory: the
                        tokenizer's own batch encoding (its Rust thread pool on every core), nothing written
  prepare_corpus        ``mecefo.data.prepare_corpus(..., tokenizer=DIR, workers=W)`` into an empty cache:
                        everything a first run pays (read the files, start W worker processes, tokenise,
                        add EOS, split, write the token files, fingerprint them)

Each is reported in tokens/s (its own count: prepare_corpus adds an EOS per document), and
prepare_corpus's rate as a ratio to the batch encoding's, the median of the per-round ratios with its
p20-p80. A ratio whose rounds spread more than ``--max-spread`` is recorded as
``throughput_ratio_unsupported``. Rows are appended to bench/results/results.csv.

Without ``--tokenizer`` a byte-level BPE tokenizer of 400 tokens is trained on 20 files of the corpus
(as tests/trainer/conftest.py's ``bpe_tokenizer``) into a temporary directory.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from records import Recorder  # noqa: E402
from timing import MAX_RATIO_SPREAD, paired_ratio, summary_timing  # noqa: E402

from mecefo.data import prepare_corpus, stdlib_sources  # noqa: E402
from mecefo.tokenizing import default_workers  # noqa: E402


def train_bpe(directory: Path, vocab: int = 400) -> Path:
    """The test suite's tokenizer: byte-level BPE on 20 files of the embedded corpus, BOS <s>, EOS </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator([p.read_text() for p in stdlib_sources()[:20]], trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>").save_pretrained(directory)
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, default=None, help="a local tokenizer directory (default: the "
                                                                     "test suite's BPE, trained here)")
    parser.add_argument("--files", type=int, default=None, help="files of the embedded corpus (default: all)")
    parser.add_argument("--workers", type=int, nargs="+", default=[default_workers()],
                        help="prepare_corpus's worker processes (default: one per CPU core)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-spread", type=float, default=MAX_RATIO_SPREAD)
    parser.add_argument("--csv", type=Path, default=None, help="append rows here (default bench/results/results.csv)")
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    scratch = Path(tempfile.mkdtemp(prefix="mecefo-bench-tokenize-"))
    try:
        tokenizer_dir = args.tokenizer or train_bpe(scratch / "bpe")
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        files = stdlib_sources()[:args.files]
        corpus_dir = scratch / "corpus"
        corpus_dir.mkdir()
        texts = []
        for i, path in enumerate(files):  # one text file per document, in the corpus's order
            texts.append(path.read_text())
            (corpus_dir / f"{i:05d}.py").write_text(texts[-1])
        megabytes = sum(len(t.encode()) for t in texts) / 1e6

        def batch() -> int:
            return sum(len(ids) for ids in tokenizer(texts)["input_ids"])

        def prepare(workers: int, round_: int) -> int:
            cache = scratch / f"cache-{workers}-{round_}"
            corpus = prepare_corpus([str(corpus_dir)], cache_dir=cache, tokenizer=str(tokenizer_dir), workers=workers)
            itemsize = np.dtype(corpus.dtype).itemsize
            count = (Path(corpus.train).stat().st_size + Path(corpus.val).stat().st_size) // itemsize
            shutil.rmtree(cache)
            return count

        seconds: dict[str, list[float]] = {"batch": [], **{f"prepare:{w}": [] for w in args.workers}}
        counts: dict[str, int] = {}
        for round_ in range(args.rounds):
            for name in seconds:
                started = time.perf_counter()
                counts[name] = batch() if name == "batch" else prepare(int(name.split(":")[1]), round_)
                seconds[name].append(time.perf_counter() - started)

        recorder = Recorder(torch.device("cpu"), **({"path": args.csv} if args.csv else {}))
        config = f"stdlib:{len(files)} files,{megabytes:.1f} MB,{Path(tokenizer_dir).name},vocab={len(tokenizer)}"
        print(f"# corpus preparation vs the tokenizer's batch encoding on {recorder.env['device']}: {config}, "
              f"{args.rounds} rounds")
        print(f"{'provider':<26}{'tokens':>11}{'s (median)':>12}{'Mtokens/s':>11}{'p20-p80':>16}{'x batch':>9}")
        flagged = []
        for name, times in seconds.items():
            quantiles = summary_timing([counts[name] / t for t in times])  # of the rates, not of times
            median, p20, p80 = quantiles.median_ms, quantiles.p20_ms, quantiles.p80_ms
            provider, mode = ("tokenizer(batch)", "rust threads") if name == "batch" else (
                "prepare_corpus", f"workers={name.split(':')[1]}")
            add = dict(benchmark="data/tokenize", provider=provider, mode=mode, config=config)
            recorder.add(**add, metric="throughput", unit="tokens/s", median=median, p20=p20, p80=p80)
            shown = ""
            if name != "batch":
                # rate ratio per round: (n_p / t_p) / (n_b / t_b) = (t_b * n_p / n_b) / t_p
                ratio = paired_ratio([b * counts[name] / counts["batch"] for b in seconds["batch"]], times)
                supported = ratio.supported(args.max_spread)
                recorder.add(**add, metric="throughput_ratio" if supported else "throughput_ratio_unsupported",
                             unit="x tokenizer batch", median=ratio.median, p20=ratio.p20, p80=ratio.p80)
                shown = f"{ratio.median:.3f}" if supported else "?"
                if not supported:
                    flagged.append(f"# {mode}: ratio {ratio.describe()} is not supported by its measurement")
            print(f"{provider + ' ' + mode:<26}{counts[name]:>11}{statistics.median(times):>12.2f}"
                  f"{median / 1e6:>11.3f}{f'{p20 / 1e6:.3f}-{p80 / 1e6:.3f}':>16}{shown:>9}")
        for line in flagged:
            print(line)
        if not args.no_save:
            print(f"appended {len(recorder.rows)} rows to {recorder.save()}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
