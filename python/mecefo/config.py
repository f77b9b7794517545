"""The trainer's options: one dataclass, its command line, and its JSON form in the run directory.

The launcher writes ``config.json`` into the run directory; every replica process (and every
restart of one) reads the same file, so all replicas agree on the model, data, schedule and
policy by construction.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .membership import DEFAULT_DROP_PENALTY, DEFAULT_MAX_LOAD, DEFAULT_PENALTY
from .noise import DEFAULT_BETA as DEFAULT_NOISE_EMA
from .policy import APPROXIMATIONS, BASES, POLICIES, TAKEOVERS, Policy, check_policy, resolve_policy
from .presets import PRESETS, get_preset

# float32 / float64: weights, optimizer state and compute in that dtype; bfloat16: mixed precision (float32
# master weights and AdamW state, bf16 compute under autocast)
DTYPES = ("float32", "float64", "bfloat16")
AUTO_PENALTIES = ("live", "fixed")
REDUCE_DTYPES = ("float32", "bfloat16")  # the gradient all-reduce: the master dtype, or bf16 (not on gloo/CPU)
INITS = ("random", "pretrained")
DEFAULT_MODEL = "tiny"
DEVICES = ("cpu", "cuda")
SHARDS = ("none", "fsdp")  # how a replica group holds the model (mecefo.sharding)
HASH_STATE_MAX_PARAMS = 50_000_000


class ConfigError(ValueError):
    """A rejected option value; ``field`` is the TrainConfig field it names (the launcher turns it into
    the command-line option, e.g. ``timeout_s`` -> ``--timeout``)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass
class TrainConfig:
    run_dir: str = "runs/train"
    # model: a preset name or a local Hugging Face model directory (None: the tiny preset, or the factory's);
    # or a factory MODULE:FUNCTION; its initial weights: random | pretrained (None: pretrained when the
    # directory holds weights)
    model: str | None = None
    model_factory: str | None = None
    init: str | None = None
    dtype: str = "float32"
    reduce_dtype: str = "float32"
    seed: int = 0
    device: str = "cpu"  # cpu, or cuda (replica i on GPU i mod the GPU count)
    # data: "stdlib" (embedded corpus), text files / directories, or one tokenised .bin file; with a tokenizer
    # also JSON Lines, Parquet, Arrow files and datasets save_to_disk directories (mecefo.documents)
    data: list[str] = field(default_factory=lambda: ["stdlib"])
    data_dtype: str = "uint16"  # element type of a tokenised .bin file
    tokenizer: str | None = None  # a local tokenizer directory (None: byte-level)
    text_field: str = "text"  # the field of a record (JSON Lines, Parquet, Arrow, datasets) that holds its text
    tokenize_workers: int | None = None  # processes that tokenise the corpus once (None: one per CPU core)
    val_percent: float = 5.0
    seq_len: int = 64
    micro_batch: int = 4  # sequences per forward/backward
    grad_accum: int = 1  # micro-batches per shard per step; global batch = replicas * grad_accum * micro_batch
    # job
    replicas: int = 4
    group_size: int = 1  # ranks per replica group (mecefo-train starts G processes per replica)
    shard: str = "none"  # none: every rank holds the whole model (DDP-style); fsdp: FSDP2 inside each group
    steps: int = 200
    policy: str = "mecefo"  # a preset (mecefo.policy.PRESETS); takeover / approximate override its fields
    takeover: str | None = None  # neighbour | spread | drop | auto (None: the preset's)
    approximate: str | None = None  # both | orphan | none | auto (None: the preset's)
    max_load: float = DEFAULT_MAX_LOAD  # spread: the most work a replica runs in a step, in shards
    neighbour_cost: float | None = None  # a neighbour-mode sequence / an exact one (None: the model's FLOP ratio)
    auto_penalty: float = DEFAULT_PENALTY  # auto: progress lost per unit share of the batch approximated
    auto_drop_penalty: float = DEFAULT_DROP_PENALTY  # auto: progress lost per unit share of the batch dropped
    # auto: live = the drop penalty predicted from the online gradient noise scale (mecefo.noise) once its
    # averages are ready (auto_drop_penalty until then); fixed = auto_drop_penalty always
    auto_penalties: str = "live"
    noise_ema: float = DEFAULT_NOISE_EMA  # the noise scale's moving-average factor per committed step
    # MeCeFO: low-rank gradient rank (int, or fraction of in_features), the bases' refresh period in
    # steps during a failure episode (None: mecefo_kernels' defaults), and what the bases come from
    rank: int | float | None = None
    tau: int | None = None
    # momentum (AdamW's first moment of each FFN weight) | weight (the paper): momentum by the fidelity runs
    # (mecefo: 1.65 points of perplexity better, in 3 of 3 seeds; orphan-only: -0.17 +- 1.2, not resolved)
    basis: str = "momentum"
    # optimizer: AdamW, linear warm-up then cosine decay to min_lr_ratio * lr
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = 1.0  # global gradient-norm clip (0: off)
    # failures
    failures: str | None = None  # "schedule:low|mid|high|FILE"
    schedule_hours: float = 24.0  # the paper's clock hours one run spans
    inject: list[str] = field(default_factory=list)  # "kill@STEP:REPLICA[:PHASE]", "hang@STEP:REPLICA[:PHASE]=SECONDS"
    restart_after: int | None = 20  # steps after a replica dies before the supervisor restarts it (None: never)
    max_restarts: int = 5  # per replica; beyond this the run is aborted
    # operations
    checkpoint_every: int = 50  # steps (0: only the final checkpoint)
    keep_checkpoints: int = 3
    resume: bool = False
    eval_every: int = 0  # steps (0: only at the end)
    eval_batches: int = 8
    hash_state: bool | None = None  # log parameter / optimizer-state hashes every step (None: if < 50M params)
    threads: int = 1  # torch threads per replica process
    bucket_mb: float = 64.0  # gradient all-reduce bucket size
    # membership (torchft)
    timeout_s: float = 10.0  # the floor of the collective and state-transfer deadlines (mecefo.deadlines)
    max_replays: int = 5  # discarded attempts of one step in a row before the run gives up
    lighthouse_wait_s: float = 300.0  # how long an unanswering lighthouse / job store is waited for
    heartbeat_timeout_s: float = 2.0  # the lighthouse drops a replica silent this long
    quorum_timeout_s: float = 300.0
    min_replicas: int = 1
    max_wall_s: float = 3600.0  # the supervisor aborts a run that takes longer
    cache_dir: str | None = None  # corpus cache (default ~/.cache/mecefo)

    def __post_init__(self):
        self.betas = tuple(self.betas)
        self.validate()

    def validate(self) -> None:
        check_policy(self.policy)
        self.resolved_policy  # noqa: B018  (raises on a bad takeover / approximate combination)
        if self.basis not in BASES:
            raise ValueError(f"basis must be one of {', '.join(BASES)}, got {self.basis!r}")
        if self.max_load < 1:
            raise ValueError(f"max_load must be >= 1 (shards of work a replica runs), got {self.max_load}")
        if self.neighbour_cost is not None and not self.neighbour_cost > 0:
            raise ValueError(f"neighbour_cost must be > 0, got {self.neighbour_cost}")
        if self.auto_penalties not in AUTO_PENALTIES:
            raise ConfigError("auto_penalties", f"auto_penalties must be one of {', '.join(AUTO_PENALTIES)}, got "
                                                f"{self.auto_penalties!r}")
        if not 0 <= self.noise_ema < 1:
            raise ConfigError("noise_ema", f"noise_ema must be in [0, 1), got {self.noise_ema}")
        if self.auto_penalty < 0 or self.auto_drop_penalty < 0:
            raise ValueError(f"auto_penalty and auto_drop_penalty must be >= 0, got {self.auto_penalty} and "
                             f"{self.auto_drop_penalty}")
        if self.model is not None and self.model_factory is not None:
            raise ConfigError("model_factory", "--model and --model-factory are exclusive: give one, not both")
        if self.init is not None and self.init not in INITS:
            raise ConfigError("init", f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.reduce_dtype not in REDUCE_DTYPES:
            raise ConfigError("reduce_dtype", f"reduce_dtype must be one of {', '.join(REDUCE_DTYPES)}, got "
                                              f"{self.reduce_dtype!r}")
        if self.reduce_dtype == "bfloat16" and (self.dtype != "bfloat16" or self.device != "cuda"):
            raise ConfigError("reduce_dtype", "reduce_dtype bfloat16 needs --dtype bfloat16 and --device cuda: on "
                                              "the CPU (gloo) gradients are all-reduced in float32")
        if self.device not in DEVICES:
            raise ConfigError("device", f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ConfigError("dtype", f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.shard not in SHARDS:
            raise ConfigError("shard", f"shard must be one of {', '.join(SHARDS)}, got {self.shard!r}")
        at_least = dict(replicas=1, group_size=1, steps=1, seq_len=1, micro_batch=1, grad_accum=1, threads=1,
                        keep_checkpoints=1, min_replicas=1,
                        eval_batches=1, warmup=0, checkpoint_every=0, eval_every=0, max_restarts=0, max_replays=0)
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise ConfigError(name, f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.model_name in PRESETS and self.seq_len > get_preset(self.model_name).max_seq_len:
            raise ConfigError("seq_len", f"seq_len {self.seq_len} exceeds preset {self.model_name!r}'s max_seq_len "
                                         f"{get_preset(self.model_name).max_seq_len}")
        if self.min_replicas > self.replicas:
            raise ConfigError("min_replicas", f"min_replicas {self.min_replicas} exceeds replicas {self.replicas}")
        if self.tokenize_workers is not None and self.tokenize_workers < 1:
            raise ConfigError("tokenize_workers", f"tokenize_workers must be >= 1, got {self.tokenize_workers}")
        if not self.text_field:
            raise ConfigError("text_field", "text_field must name a field, got ''")
        if not 0 < self.val_percent < 100:
            raise ConfigError("val_percent", f"val_percent must be in (0, 100), got {self.val_percent}")
        if self.rank is not None and (self.rank <= 0 or (isinstance(self.rank, float) and self.rank > 1)):
            raise ConfigError("rank", f"rank must be an int >= 1 or a fraction in (0, 1], got {self.rank}")
        if self.tau is not None and self.tau < 1:
            raise ConfigError("tau", f"tau must be >= 1, got {self.tau}")
        if self.restart_after is not None and self.restart_after < 0:
            raise ConfigError("restart_after", f"restart_after must be >= 0 steps, got {self.restart_after}")
        for name in ("timeout_s", "heartbeat_timeout_s", "quorum_timeout_s", "lr", "schedule_hours", "bucket_mb",
                     "max_wall_s", "lighthouse_wait_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(name, f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("clip", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise ConfigError(name, f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("min_lr_ratio", f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("betas", f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.failures is not None and not self.failures.startswith("schedule:"):
            raise ConfigError("failures", f"failures must look like schedule:low|mid|high|FILE, got {self.failures!r}")

    @property
    def resolved_policy(self) -> Policy:
        """The policy preset with --takeover / --approximate applied."""
        return resolve_policy(self.policy, takeover=self.takeover, approximate=self.approximate)

    @property
    def model_name(self) -> str | None:
        """The preset name or model directory (None: a factory builds the model)."""
        if self.model is not None:
            return self.model
        return None if self.model_factory is not None else DEFAULT_MODEL

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir)

    @property
    def sequences_per_shard(self) -> int:
        """A shard of the global batch: grad_accum micro-batches of micro_batch sequences."""
        return self.grad_accum * self.micro_batch

    @property
    def tokens_per_shard(self) -> int:
        return self.sequences_per_shard * self.seq_len

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        if "preset" in data and "model" not in data:  # run directories written before --model
            data = {("model" if k == "preset" else k): v for k, v in data.items()}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")


def _rank(text: str) -> int | float:
    return float(text) if "." in text or "e" in text.lower() else int(text)


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("never", "none") else int(text)


def add_train_arguments(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    """The mecefo-train options; `defaults` supplies the default values (the demo has its own)."""
    d = defaults
    g = parser.add_argument_group("model and data")
    g.add_argument("--model", "--preset", dest="model", default=d.model, metavar="PRESET|DIR",
                   help=f"a preset shape ({', '.join(PRESETS)}; default {DEFAULT_MODEL}) or a local Hugging Face "
                        "model directory (config.json, weights in *.safetensors); nothing is downloaded")
    g.add_argument("--init", default=d.init, choices=INITS,
                   help="initial weights of a model directory: pretrained (its safetensors: continued training, "
                        "fine-tuning; the default when it has weights) or random (pre-training from its config)")
    g.add_argument("--model-factory", default=d.model_factory, metavar="MODULE:FUNCTION",
                   help="your own model: a callable returning an nn.Module whose forward takes input_ids and returns "
                        "logits (or .logits); MeCeFO's neighbour mode needs LLaMA-family decoder layers")
    g.add_argument("--dtype", default=d.dtype, choices=DTYPES,
                   help="float32 / float64: everything in that dtype; bfloat16: mixed precision (float32 master "
                        "weights and AdamW state, bf16 compute under autocast)")
    g.add_argument("--reduce-dtype", default=d.reduce_dtype, choices=REDUCE_DTYPES,
                   help="dtype of the gradient all-reduce: float32 (the master weights'; float64 with --dtype "
                        "float64) or bfloat16 (--dtype bfloat16 on --device cuda only: gloo reduces float32)")
    g.add_argument("--device", default=d.device, choices=DEVICES,
                   help="cuda: every rank on its own GPU (mecefo-train: (replica x group size + rank) mod the GPU "
                        "count; mecefo-group: LOCAL_RANK), collectives over NCCL (mecefo.backends)")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--data", nargs="+", default=d.data, metavar="SRC",
                   help="'stdlib' (the Python standard library's sources, byte-level; no download), "
                        "text files / directories (byte-level), or one tokenised .bin file; JSON Lines (.jsonl), "
                        "Parquet (.parquet), Arrow (.arrow) files and datasets save_to_disk directories give one "
                        "document per record (tokenised with --tokenizer, else byte-level)")
    g.add_argument("--data-dtype", default=d.data_dtype, choices=("uint8", "uint16", "int32"),
                   help="element type of a tokenised .bin file")
    g.add_argument("--tokenizer", default=d.tokenizer, metavar="DIR",
                   help="a local Hugging Face tokenizer directory (read offline): --data is tokenised with it once, "
                        "into the corpus cache, the tokenizer's EOS after each document")
    g.add_argument("--text-field", default=d.text_field, metavar="FIELD",
                   help="the field of a JSON Lines / Parquet / Arrow / datasets record that holds its text "
                        "(default %(default)s)")
    g.add_argument("--tokenize-workers", type=int, default=d.tokenize_workers, metavar="N",
                   help="processes that tokenise the corpus (default: one per CPU core)")
    g.add_argument("--val-percent", type=float, default=d.val_percent)
    g.add_argument("--seq-len", type=int, default=d.seq_len)
    g.add_argument("--micro-batch", type=int, default=d.micro_batch,
                   help="sequences per forward/backward (peak activation memory is one micro-batch's)")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum,
                   help="micro-batches per shard per step: global batch = replicas x grad-accum x micro-batch "
                        "sequences (default %(default)s)")

    g = parser.add_argument_group("job")
    g.add_argument("--run-dir", default=d.run_dir, help="where metrics, checkpoints, logs, plot go")
    g.add_argument("--replicas", type=int, default=d.replicas, help="data-parallel replicas = shards per global batch")
    g.add_argument("--group-size", type=int, default=d.group_size,
                   help="ranks per replica group: mecefo-train starts G processes per replica, each a rank of "
                        "the group (default %(default)s; mecefo-group takes it from torchrun / srun)")
    g.add_argument("--shard", default=d.shard, choices=SHARDS,
                   help="how a group holds the model: none (every rank the whole model and optimizer state, "
                        "gradients summed DDP-style) or fsdp (FSDP2 inside the group: each rank 1/G of them; "
                        "default %(default)s)")
    g.add_argument("--steps", type=int, default=d.steps)
    g.add_argument("--policy", default=d.policy, choices=POLICIES,
                   help="what happens to a dead replica's shard (README, 'Policies'): mecefo (its neighbour runs "
                        "it, both shards in MeCeFO neighbour mode), ndb-exact (its neighbour runs it exactly), "
                        "spread (its sequences spread over every live replica, exact), spread-orphan / "
                        "neighbour-orphan (only the taken-over sequences in neighbour mode), auto (per step, the "
                        "plan with the least predicted time per unit of training progress), shrink "
                        "(dropped, torchft's default), restart (checkpoint-restart the whole job)")
    g.add_argument("--takeover", default=d.takeover, choices=TAKEOVERS,
                   help="override the policy's takeover: who runs a dead replica's sequences")
    g.add_argument("--approximate", default=d.approximate, choices=APPROXIMATIONS,
                   help="override the policy's approximation: which work runs in MeCeFO neighbour mode")
    g.add_argument("--max-load", type=float, default=d.max_load,
                   help="spread: the most work one replica runs in a step, in shards (default %(default)s); "
                        "sequences beyond every replica's bound are dropped and reported")
    g.add_argument("--neighbour-cost", type=float, default=d.neighbour_cost,
                   help="time of a neighbour-mode sequence / an exact one, for spreading and auto (default: "
                        "the model's FLOP ratio; bench/step.py's neighbor/normal on your hardware is better)")
    g.add_argument("--auto-penalty", type=float, default=d.auto_penalty,
                   help="auto: training progress lost per unit share of the batch run in neighbour mode (default "
                        "%(default)s, measured by bench/fidelity.py): exact work is preferred while it costs at most "
                        "1/(1 - penalty x share) - 1 more step time")
    g.add_argument("--auto-drop-penalty", type=float, default=d.auto_drop_penalty,
                   help="auto: training progress lost per unit share of the batch dropped (default %(default)s, "
                        "measured by bench/fidelity.py); with --auto-penalties live, only until the noise scale's "
                        "estimate is ready")
    g.add_argument("--auto-penalties", default=d.auto_penalties, choices=AUTO_PENALTIES,
                   help="auto: live (default) = the drop penalty B_noise / (B + B_noise) from the gradient noise "
                        "scale measured while training; fixed = --auto-drop-penalty throughout. The approximation "
                        "penalty is --auto-penalty either way")
    g.add_argument("--noise-ema", type=float, default=d.noise_ema,
                   help="moving-average factor per step of the gradient noise scale's |G|^2 and tr(Sigma) "
                        "(default %(default)s: a window of ~50 steps)")
    g.add_argument("--rank", type=_rank, default=d.rank,
                   help="MeCeFO low-rank gradient rank: an int, or a fraction of each weight's in_features "
                        "(default: mecefo_kernels' default)")
    g.add_argument("--tau", type=int, default=d.tau,
                   help="refresh the low-rank bases every TAU steps during a failure (default: mecefo_kernels')")
    g.add_argument("--basis", default=d.basis, choices=BASES,
                   help="low-rank bases from each FFN weight (the paper) or from its AdamW first moment "
                        "(gradient-aware; default %(default)s)")

    g = parser.add_argument_group("optimizer (AdamW, warm-up + cosine)")
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    g.add_argument("--warmup", type=int, default=d.warmup)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--clip", type=float, default=d.clip, help="gradient-norm clip (0: off)")

    g = parser.add_argument_group("failures")
    g.add_argument("--failures", default=d.failures, metavar="schedule:low|mid|high|FILE",
                   help="the paper's failure scenarios scaled to steps (seeded), or a file of "
                        "'REPLICA START END' lines; failed replicas sit out, neighbours take over")
    g.add_argument("--schedule-hours", type=float, default=d.schedule_hours,
                   help="hours of the paper's clock the run spans (default %(default)s)")
    g.add_argument("--inject", action="append", default=list(d.inject), metavar="SPEC",
                   help="real failure: kill@STEP:REPLICA[:PHASE] (SIGKILL) or hang@STEP:REPLICA[:PHASE]=SECONDS "
                        "(SIGSTOP, SIGCONT later); PHASE is step (default), quorum, allreduce or send; "
                        "REPLICA may be * for send. Repeatable")
    g.add_argument("--restart-after", type=_optional_int, default=d.restart_after, metavar="STEPS|never",
                   help="restart a dead replica this many steps after it died (default %(default)s)")
    g.add_argument("--max-restarts", type=int, default=d.max_restarts)

    g = parser.add_argument_group("operations")
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    g.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    g.add_argument("--resume", action="store_true", default=d.resume,
                   help="continue from the newest valid checkpoint in --run-dir")
    g.add_argument("--eval-every", type=int, default=d.eval_every)
    g.add_argument("--eval-batches", type=int, default=d.eval_batches)
    g.add_argument("--hash-state", dest="hash_state", action="store_true", default=d.hash_state,
                   help="log parameter / optimizer-state hashes every step (default: for models under 50M "
                        "parameters; hashing costs about a second per GB of state)")
    g.add_argument("--no-hash-state", dest="hash_state", action="store_false")
    g.add_argument("--threads", type=int, default=d.threads, help="torch threads per replica")
    g.add_argument("--bucket-mb", type=float, default=d.bucket_mb)
    g.add_argument("--timeout", dest="timeout_s", type=float, default=d.timeout_s,
                   help="seconds a peer may be silent beyond its predicted work: the floor of every collective "
                        "and state-transfer deadline, which grow with the plan's imbalance and the state's size "
                        "(default %(default)s)")
    g.add_argument("--max-replays", type=int, default=d.max_replays,
                   help="discarded attempts of one step in a row before the run ends with exit 1 (default "
                        "%(default)s)")
    g.add_argument("--lighthouse-wait", dest="lighthouse_wait_s", type=float, default=d.lighthouse_wait_s,
                   help="seconds a group waits for a lighthouse or job store that does not answer (dead, "
                        "restarting, cut off) before it ends with exit 1 and a checkpoint (default %(default)s)")
    g.add_argument("--heartbeat-timeout", dest="heartbeat_timeout_s", type=float, default=d.heartbeat_timeout_s,
                   help="seconds of silence after which the lighthouse drops a replica")
    g.add_argument("--quorum-timeout", dest="quorum_timeout_s", type=float, default=d.quorum_timeout_s)
    g.add_argument("--min-replicas", type=int, default=d.min_replicas)
    g.add_argument("--max-wall", dest="max_wall_s", type=float, default=d.max_wall_s)
    g.add_argument("--cache-dir", default=d.cache_dir, help="corpus cache (default ~/.cache/mecefo)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    return TrainConfig(**values)
