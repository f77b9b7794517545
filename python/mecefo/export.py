"""``python -m mecefo.export RUN_DIR [--step N] [--out DIR]``: a checkpoint as a model directory that
``transformers.AutoModelForCausalLM.from_pretrained`` loads (config + safetensors, the tokenizer when the run
had one; :func:`mecefo.models.export_model`).

The trainer writes ``RUN_DIR/final`` itself at the end of a run; this exports any other checkpoint
(the newest intact one by default), e.g. of a run that is still going or was interrupted. The
checkpoint is verified first; a corrupt one is refused, naming the file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .checkpoint import CheckpointCorruptError, checkpoint_path, list_checkpoints, read_checkpoint
from .command import OneLineErrors
from .config import TrainConfig


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrors(prog="python -m mecefo.export", description=__doc__.splitlines()[0].strip("`"))
    parser.add_argument("run_dir", help="the run's --run-dir")
    parser.add_argument("--step", type=int, help="the checkpoint of this step (default: the newest intact one)")
    parser.add_argument("--out", help="the model directory to write (default: RUN_DIR/export/step_N)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not (run_dir / "config.json").is_file():
        parser.error(f"argument run_dir: {run_dir} holds no config.json: not a run directory")
    from .replica import CHECKPOINT_DIR

    found = list_checkpoints(run_dir / CHECKPOINT_DIR)
    if not found:
        parser.error(f"argument run_dir: {run_dir / CHECKPOINT_DIR} holds no checkpoint to export")
    if args.step is not None:
        path = checkpoint_path(run_dir / CHECKPOINT_DIR, args.step)
        if not path.is_file():
            have = ", ".join(str(s) for s, _ in found)
            parser.error(f"argument --step: no checkpoint of step {args.step} in {run_dir / CHECKPOINT_DIR} "
                         f"(there are: {have})")
        candidates = [(args.step, path)]
    else:
        candidates = found
    state = step = None
    for step, path in candidates:
        try:
            state = read_checkpoint(path)
            break
        except CheckpointCorruptError as e:
            if args.step is not None:
                parser.error(f"argument --step: {e}")
            print(f"python -m mecefo.export: warning: {e}; trying the previous checkpoint", file=sys.stderr)
    if state is None:
        parser.error(f"argument run_dir: no intact checkpoint in {run_dir / CHECKPOINT_DIR}")
    cfg = TrainConfig.load(run_dir / "config.json")
    from .data import CorpusFiles
    from .models import export_model, resolve_model_source
    from .replica import CORPUS_FILE

    corpus = CorpusFiles(**json.loads((run_dir / CORPUS_FILE).read_text()))
    out = Path(args.out) if args.out else run_dir / "export" / f"step_{step:08d}"
    try:
        source = resolve_model_source(cfg, corpus_vocab=corpus.vocab,
                                      tokenised=corpus.tokenizer is not None)
        export_model(state["model"], cfg, out, source=source, step=step,
                     lineage=state.get("trainer", {}).get("lineage"))
    except (ValueError, OSError) as e:
        parser.config_error(e) if isinstance(e, ValueError) else parser.error(f"argument --out: {e}")
    print(f"exported step {step} of {run_dir} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
