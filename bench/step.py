"""What a MeCeFO neighbour costs: one decoder block, a model micro-batch and a training step.

    python bench/step.py                  # GPU: llama-350m, llama-1b, a llama-7b slice; seq 2048, 4096; bf16
                                          # CPU: tiny and small, seq 256, fp32 (ratios only)
    python bench/step.py --presets llama-1b --seq 2048 --scopes block model

Scenarios, each on a LlamaForCausalLM patched with mecefo_kernels.apply_mecefo:

  normal             one normal micro-batch (a replica with no failure around it)
  neighbor           one neighbour-mode micro-batch (attention backward skipped, FFN recomputed,
                     low-rank FFN weight gradients)
  mecefo-both        a MeCeFO neighbour doing its own shard and the failed rank's: two neighbour micro-batches
  exact-both         exact Neighbor-Do-Both: two normal micro-batches, one after the other
  exact-both-concat  exact Neighbor-Do-Both as one micro-batch of both shards (twice the activations)

Scopes: ``block`` (one decoder layer, forward + backward), ``model`` (embedding to loss, forward +
backward), ``step`` (model scope + AdamW step). Per scenario: time (median, p20, p80), peak memory
(CUDA), the activation memory saved for backward by one micro-batch (saved_tensors_hooks; works on
CPU too), and the analytic FLOP floor (MECEFO.md, "What a neighbour step costs"), each also as a
ratio to ``normal`` so the gap between measured and floor ratios is visible. Rows are appended to
bench/results/results.csv. On CPU only the ratios mean anything.

Time ratios are paired (bench/timing.py): the scenarios are timed in interleaved rounds and a
scenario's ratio is the median of its per-round ratios to ``normal``. A ratio whose per-round
values spread more than ``--max-spread`` is measured again (``--reruns``, with as many rounds
again); if it still spreads, it is flagged, printed as ``?`` with its spread, and recorded as
metric ``time_ratio_unsupported`` instead of ``time_ratio``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from records import Recorder  # noqa: E402
from timing import MAX_RATIO_SPREAD, Ratio, interleaved_rounds, paired_ratio, peak_memory_bytes, summary_timing  # noqa: E402,E501

import mecefo_kernels as mk  # noqa: E402
from mecefo_kernels.memory import SavedTensors  # noqa: E402
from mecefo.flops import layer_flops, model_flops  # noqa: E402
from mecefo.presets import ModelPreset, get_preset  # noqa: E402


@dataclass(frozen=True)
class Scenario:
    neighbor: bool  # micro-batches run in neighbour mode
    micro_batches: int  # run one after the other, gradients accumulated
    shards_per_micro_batch: int  # shards concatenated into one micro-batch


SCENARIOS = {
    "normal": Scenario(False, 1, 1),
    "neighbor": Scenario(True, 1, 1),
    "mecefo-both": Scenario(True, 2, 1),
    "exact-both": Scenario(False, 2, 1),
    "exact-both-concat": Scenario(False, 1, 2),
}
SCOPES = ("block", "model", "step")


# --------------------------------------------------------------------------- the FLOP floor


@dataclass(frozen=True)
class Shape:
    batch: int  # sequences per micro-batch (per shard)
    seq: int
    d: int
    h: int
    kv: int  # key/value width (heads * head_dim)
    layers: int
    vocab: int
    ranks: tuple[int, int, int]  # low-rank bases of gate, up, down

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


def micro_batch_flops(s: Shape, scope: str, neighbor: bool, batch: int) -> float:
    """Forward + backward of one micro-batch of ``batch`` sequences (mecefo.flops: layer, or whole model)."""
    ranks = s.ranks if neighbor else None
    if scope == "block":
        return layer_flops(batch, s.seq, s.d, s.h, s.kv, ranks)
    return model_flops(batch, s.seq, s.d, s.h, s.kv, s.layers, s.vocab, ranks)


def floor_flops(s: Shape, scope: str, scenario: str) -> float:
    """The analytic FLOP floor of one scenario (the optimizer step adds no matmul FLOPs)."""
    sc = SCENARIOS[scenario]
    return sc.micro_batches * micro_batch_flops(s, scope, sc.neighbor, s.batch * sc.shards_per_micro_batch)


# --------------------------------------------------------------------------- workloads


@dataclass
class Workload:
    """One scope's model (or block) and its two shards; ``scenario(name)`` is the closure to time."""

    forward: Callable[[torch.Tensor], torch.Tensor]  # -> a scalar to backpropagate
    module: torch.nn.Module  # holds the mode flag (patched)
    inputs: tuple[torch.Tensor, torch.Tensor]  # the two shards
    optimizer: torch.optim.Optimizer | None = None

    def micro_batch(self, inputs: torch.Tensor, neighbor: bool) -> None:
        with mk.neighbor_mode(self.module, enabled=neighbor):
            loss = self.forward(inputs)
        loss.backward()

    def micro_batch_inputs(self, sc: Scenario) -> list[torch.Tensor]:
        if sc.shards_per_micro_batch == 2:
            return [torch.cat(self.inputs)]
        return list(self.inputs[:sc.micro_batches])

    def scenario(self, name: str) -> Callable[[], None]:
        sc = SCENARIOS[name]
        inputs = self.micro_batch_inputs(sc)

        def run():
            for x in inputs:
                self.micro_batch(x, sc.neighbor)
            if self.optimizer is not None:
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        return run

    def saved_bytes(self, name: str) -> int:
        """Activations held at the end of one micro-batch's forward (micro-batches of a scenario run one
        after the other, each freeing its activations in its backward, so one is the peak)."""
        sc = SCENARIOS[name]
        first = self.micro_batch_inputs(sc)[0]
        own = (*self.module.parameters(), *self.module.buffers())
        with mk.neighbor_mode(self.module, enabled=sc.neighbor):
            with SavedTensors(exclude=own) as meter:
                self.forward(first)
            return meter.bytes


def build_model(preset: ModelPreset, layers: int, rank, dtype, device):
    from transformers import LlamaForCausalLM

    config = preset.to_llama_config(num_hidden_layers=layers, attn_implementation="sdpa")
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    return mk.apply_mecefo(model, rank=rank), config


def model_workload(preset, layers, batch, seq, rank, dtype, device, with_optimizer: bool) -> tuple[Workload, Shape]:
    model, config = build_model(preset, layers, rank, dtype, device)
    gen = torch.Generator().manual_seed(0)
    shards = tuple(torch.randint(0, config.vocab_size, (batch, seq), generator=gen).to(device) for _ in range(2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5) if with_optimizer else None
    work = Workload(lambda ids: model(input_ids=ids, labels=ids).loss, model, shards, optimizer)
    return work, shape_of(model, batch, seq)


def block_workload(preset, batch, seq, rank, dtype, device) -> tuple[Workload, Shape]:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model, config = build_model(preset, 1, rank, dtype, device)
    layer = model.model.layers[0]
    with torch.device(device):
        rotary = LlamaRotaryEmbedding(config)
    positions = rotary(torch.empty(1, dtype=dtype, device=device), torch.arange(seq, device=device)[None])
    gen = torch.Generator().manual_seed(0)
    shards = tuple(torch.randn(batch, seq, config.hidden_size, generator=gen).to(device=device, dtype=dtype)
                   .requires_grad_() for _ in range(2))
    shape = shape_of(model, batch, seq)

    def forward(x):
        return layer(x, position_embeddings=positions).float().square().mean()  # a scalar reaching every output
    return Workload(forward, layer, shards), shape


def shape_of(model, batch: int, seq: int) -> Shape:
    config = model.config
    layer = model.model.layers[0]
    ranks = tuple(b.shape[1] for b in (layer.mecefo_basis_gate, layer.mecefo_basis_up, layer.mecefo_basis_down))
    head_dim = config.hidden_size // config.num_attention_heads
    return Shape(batch, seq, config.hidden_size, config.intermediate_size, config.num_key_value_heads * head_dim,
                 config.num_hidden_layers, config.vocab_size, ranks)


# --------------------------------------------------------------------------- main


def rank_arg(text: str) -> int | float:
    """"128" -> 128 (an int rank); "1/32" or "0.03125" -> a fraction of in_features."""
    if "/" in text:
        num, den = text.split("/")
        return float(num) / float(den)
    return float(text) if "." in text else int(text)


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["llama-350m", "llama-1b", "llama-7b"] if cuda
                        else ["tiny", "small"])
    parser.add_argument("--layers", type=int, nargs="+", default=None,
                        help="decoder layers per preset (default: all; llama-7b: a 4-layer slice)")
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 4096] if cuda else [256])
    parser.add_argument("--batch", type=int, default=1, help="sequences per shard (micro-batch)")
    parser.add_argument("--rank", type=rank_arg, default=None,
                        help="low-rank gradient rank: int or fraction such as 1/32 (default: apply_mecefo's)")
    parser.add_argument("--scopes", nargs="+", default=list(SCOPES), choices=SCOPES)
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--dtype", default="bfloat16" if cuda else "float32",
                        choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--rep-ms", type=float, default=None, help="timing budget per scenario")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved timing rounds over the scenarios (default: 3 on GPU, 9 on CPU)")
    parser.add_argument("--max-spread", type=float, default=MAX_RATIO_SPREAD,
                        help="a time ratio whose per-round values spread more than this fraction of its median "
                             "(p80 - p20) is rerun, then flagged (default %(default)s)")
    parser.add_argument("--reruns", type=int, default=1, help="reruns of a measurement whose ratio spreads too much")
    parser.add_argument("--csv", type=Path, default=None, help="append rows here (default bench/results/results.csv)")
    parser.add_argument("--no-save", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.layers is not None and len(args.layers) != len(args.presets):
        parser.error("--layers takes one value per preset")

    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype)
    rank = args.rank if args.rank is not None else mk.nn.decoder.DEFAULT_RANK
    rep_ms = args.rep_ms or (200 if cuda else 1000)
    rounds = args.rounds or (3 if cuda else 9)
    recorder = Recorder(device, **({"path": args.csv} if args.csv else {}))
    print(f"# step costs on {recorder.env['device']}, {args.dtype}, rank {rank}")
    print(f"{'config':<34}{'scope':<7}{'scenario':<19}{'ms':>10}{'x normal':>9}{'floor x':>8}"
          f"{'saved MiB':>11}{'x normal':>9}{'peak MiB':>10}")
    for index, preset_name in enumerate(args.presets):
        preset = get_preset(preset_name)
        layers = (args.layers[index] if args.layers else
                  4 if preset_name == "llama-7b" else preset.num_layers)
        for seq in args.seq:
            for scope in args.scopes:
                if scope == "block":
                    work, shape = block_workload(preset, args.batch, seq, rank, dtype, device)
                else:
                    work, shape = model_workload(preset, layers, args.batch, seq, rank, dtype, device,
                                                 with_optimizer=scope == "step")
                config = (f"{preset_name}:L={1 if scope == 'block' else layers},B={args.batch},S={seq},"
                          f"r={'/'.join(map(str, shape.ranks))}")
                measure(recorder, work, shape, scope, config, args.scenarios, device, rep_ms, rounds,
                        max_spread=args.max_spread, reruns=args.reruns)
                del work
                if cuda:
                    torch.cuda.empty_cache()
    if not args.no_save:
        print(f"appended {len(recorder.rows)} rows to {recorder.save()}")
    return 0


def release_after_oom(grads_to_none: list[torch.Tensor]) -> None:
    for t in grads_to_none:
        t.grad = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def interleaved_times(fns: dict[str, Callable[[], None]], device, rep_ms: float, rounds: int,
                      grads_to_none: list[torch.Tensor]) -> dict[str, list[float] | None]:
    """Per-round times of every scenario in interleaved rounds (bench/timing.interleaved_rounds); a
    scenario that runs out of memory (exact Neighbor-Do-Both at the large presets) gets None."""
    out_of_memory: set[str] = set()

    def skip(name: str, error: BaseException) -> bool:
        if not isinstance(error, torch.OutOfMemoryError):
            return False
        out_of_memory.add(name)
        release_after_oom(grads_to_none)
        return True

    times = interleaved_rounds(fns, device, rep_ms=rep_ms, rounds=rounds, grad_to_none=grads_to_none, skip=skip)
    return {name: None if name in out_of_memory else values for name, values in times.items()}


def paired_ratios(fns: dict[str, Callable[[], None]], device, rep_ms: float, rounds: int,
                  grads_to_none: list[torch.Tensor], *, baseline: str = "normal", max_spread: float = MAX_RATIO_SPREAD,
                  reruns: int = 1) -> tuple[dict[str, list[float] | None], dict[str, Ratio]]:
    """Per-round times and each scenario's paired ratio to ``baseline``; while a ratio is unsupported, the
    rounds are run again (``reruns`` times, as many rounds each) and the ratios taken over all of them."""
    times = interleaved_times(fns, device, rep_ms, rounds, grads_to_none)
    for attempt in range(reruns + 1):
        base = times.get(baseline)
        ratios = {} if base is None else {
            name: paired_ratio(values, base) for name, values in times.items() if values is not None}
        if attempt == reruns or all(r.supported(max_spread) for r in ratios.values()):
            return times, ratios
        more = interleaved_times(fns, device, rep_ms, rounds, grads_to_none)
        times = {name: None if values is None or more[name] is None else values + more[name]
                 for name, values in times.items()}
    raise AssertionError("unreachable")


def measure(recorder, work: Workload, shape: Shape, scope: str, config: str, scenarios, device, rep_ms,
            rounds, max_spread: float = MAX_RATIO_SPREAD, reruns: int = 1) -> None:
    grads_to_none = list(work.module.parameters()) + [x for x in work.inputs if x.requires_grad]
    fns = {name: work.scenario(name) for name in scenarios}
    times, ratios = paired_ratios(fns, device, rep_ms, rounds, grads_to_none, max_spread=max_spread, reruns=reruns)
    results = {}
    for name, fn in fns.items():
        for t in grads_to_none:
            t.grad = None
        try:
            if times[name] is None:
                raise torch.OutOfMemoryError(f"{name} ran out of memory while timed")
            results[name] = (summary_timing(times[name]), peak_memory_bytes(fn, device), work.saved_bytes(name),
                             floor_flops(shape, scope, name))
        except torch.OutOfMemoryError:
            release_after_oom(grads_to_none)
            recorder.add(benchmark=f"step/{scope}", provider="mecefo", mode=name, config=config, metric="out_of_memory",
                         unit="bool", median=1)
            print(f"{config:<34}{scope:<7}{name:<19}{'out of memory':>10}")
    base = results.get("normal")
    flagged = []
    for name, (timing, peak, saved, floor) in results.items():
        def add(metric, unit, value, **quantiles):
            recorder.add(benchmark=f"step/{scope}", provider="mecefo", mode=name, config=config, metric=metric,
                         unit=unit, median=value, **quantiles)

        add("time", "ms", timing.median_ms, p20=timing.p20_ms, p80=timing.p80_ms)
        add("saved_activations", "MiB", saved / 2**20)
        add("flop_floor", "GFLOP", floor / 1e9)
        if peak is not None:
            add("peak_memory", "MiB", peak / 2**20)
        time_x, floor_x, saved_x = "", "", ""
        if base is not None:
            ratio = ratios[name]
            if ratio.supported(max_spread):
                add("time_ratio", "x normal", ratio.median, p20=ratio.p20, p80=ratio.p80)
                time_x = f"{ratio.median:.3f}"
            else:
                add("time_ratio_unsupported", "x normal", ratio.median, p20=ratio.p20, p80=ratio.p80)
                time_x = "?"
                flagged.append(f"# {config} {scope} {name}: time ratio {ratio.describe()} is not supported by its "
                               f"measurement (spread above {max_spread:.0%} or under 3 rounds): not a result")
            add("flop_floor_ratio", "x normal", floor / base[3])
            add("saved_activations_ratio", "x normal", saved / base[2])
            floor_x, saved_x = f"{floor / base[3]:.3f}", f"{saved / base[2]:.3f}"
            if peak is not None and base[1]:
                add("peak_memory_ratio", "x normal", peak / base[1])
        print(f"{config:<34}{scope:<7}{name:<19}{timing.median_ms:>10.2f}{time_x:>9}{floor_x:>8}"
              f"{saved / 2**20:>11.2f}{saved_x:>9}{'' if peak is None else f'{peak / 2**20:.0f}':>10}")
    for line in flagged:
        print(line)


if __name__ == "__main__":
    sys.exit(main())
