"""One replica's training loop over torchft (``python -m mecefo.replica``; started by the launcher).

Every step:

1. synchronous quorum (torchft): the live set is known, and a replica that was behind (just
   restarted, or its last commit failed) has healed from a peer: model, optimizer state, step,
   and so LR schedule and data position;
2. the step plan (:mod:`mecefo.membership`): which sequences this replica runs, in which mode
   (exact or MeCeFO's neighbour mode); scheduled failures take replicas out here; the low-rank
   bases are refreshed (by every replica, at the same steps) when the plan needs them;
3. forward + backward of each work item as its own micro-batch, gradients accumulated;
4. gradient SUM all-reduce and the MeCeFO normalisers (:mod:`mecefo.sync`), global loss;
5. torchft's commit: the update is applied only if nothing failed; otherwise the step is
   discarded and replayed with the new quorum (batches are a function of the step, so the
   replay sees the same data). A step is thus never applied twice nor lost. How long the
   collectives wait follows the plan's imbalance, and a step discarded more than
   ``--max-replays`` times in a row ends the run (:mod:`mecefo.deadlines`);
6. metrics, and periodically a checkpoint (written by the lowest live replica) and evaluation.

A replica may be a group of G ranks (``mecefo.group``, :mod:`mecefo.ranks`): each rank runs its
piece of the group's work, gradients and the loss are summed inside the group first, and the
checkpoint, evaluation and the replica's metrics file are written by the group's rank 0 (the
other ranks' records go to ``metrics/ranks/``). Under the single-host launcher every replica is
a group of one rank.

Fencing (:mod:`mecefo.fencing`): after the quorum, a replica whose step the job already committed
is behind with nobody to heal from, and every commit claims its step for its quorum in the job's
ledger first; a replica that fails either rule applies nothing, writes nothing and exits with
FENCED_EXIT_CODE. A group (``guard``, :class:`mecefo.group.GroupGuard`) also checks after every
quorum that it still holds its index (a replaced holder is fenced before it posts a gradient); a
quorum that lists one index twice trains nothing; and a group whose steps keep failing while the
others cannot be reached leaves the job. Exit codes: 0 the job's last step is committed;
RESTART_EXIT_CODE (policy restart); FENCED_EXIT_CODE; GAVE_UP_EXIT_CODE (replays exhausted, the
run ends); anything else is a crash.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .backends import local_backends
from .config import HASH_STATE_MAX_PARAMS, TrainConfig
from .data import Batches, CorpusFiles
from .failures import Injector, load_schedule, parse_injection
from .costs import WorkCosts, neighbour_flop_ratio
from .deadlines import CutOff, Deadlines, ReplayBudget, ReplaysExhausted
from .fencing import FENCED_EXIT_CODE, ROOT_LINEAGE, CommitLedger, Fenced, next_lineage
from .jobstore import JobStore
from .membership import plan_step
from .model import compute_context, evaluate, optimizer_hash, parameter_hash, replica_device
from .models import ModelSource, build_model, export_model, model_vocab, resolve_model_source
from .neighbor import neighbor_path, refresh_due
from .noise import NoiseScale, estimate, local_terms
from .optim import build_optimizer, lr_at, set_lr
from .quorum import LOOPBACK, Membership, connect_store
from .ranks import GroupBatches, GroupFailed, IntraGroup, rank_items
from .report import METRICS_DIR, MetricsWriter, metrics_path
from .sharding import model_holding, state_bytes
from .sync import GradientSync

RESTART_EXIT_CODE = 75  # policy restart: this replica asks the supervisor to restart the whole job
GAVE_UP_EXIT_CODE = 77  # a step was discarded more than --max-replays times in a row: the run ends
PROBE_AFTER = 2  # discarded attempts of one step in a row after which a group probes the others (guard)
CHECKPOINT_DIR = "checkpoints"
CORPUS_FILE = "corpus.json"
MODEL_FILE = "model.json"  # the model's identity (mecefo.models.model_identity), written before any replica starts
FINAL_DIR = "final"  # the trained model, from_pretrained-loadable (mecefo.models.export_model)
RESTART_REQUEST_FILE = "restart_request.json"


def work_costs(cfg: TrainConfig, source: ModelSource) -> WorkCosts:
    """The per-sequence costs every replica plans with: --neighbour-cost, else the model's FLOP ratio (a
    factory model has no known shape: the default ratio)."""
    if cfg.neighbour_cost is not None:
        return WorkCosts(neighbour=cfg.neighbour_cost)
    if source.shape is None:
        return WorkCosts()
    from mecefo_kernels.nn.decoder import DEFAULT_RANK

    return WorkCosts(neighbour=neighbour_flop_ratio(source.shape, cfg.seq_len, cfg.rank or DEFAULT_RANK))


def rank_metrics_path(run_dir: Path, replica: int, rank: int) -> Path:
    """Where rank ``rank`` > 0 of replica group ``replica`` writes its records (rank 0 writes the replica's)."""
    return run_dir / METRICS_DIR / "ranks" / f"replica_{replica}_rank_{rank}.jsonl"


class Replica:
    """One replica (a group of ``ranks.world_size`` ranks; this process is rank ``ranks.rank``).

    ``group_store`` (HOST:PORT) is the group's store hosted by its rank 0 (None: a replica of one
    rank hosts its own); ``advertise`` is the address this rank's servers bind and are reached at;
    ``device_index`` picks the GPU (None: the replica index); ``store_generation`` keys this launch's
    ledger and launch barrier in the job's store (None: ``generation``).
    """

    def __init__(self, cfg: TrainConfig, replica: int, *, lighthouse: str, barrier: str | None = None,
                 generation: int = 0, rejoin: bool = False, resume: bool = False, restart_consumed: int = -1,
                 ranks: IntraGroup | None = None, group_store: str | None = None, advertise: str = LOOPBACK,
                 device_index: int | None = None, store_generation: int | None = None, guard=None):
        start = time.time()
        self.cfg = cfg
        self.replica = replica
        self.ranks = ranks = ranks or IntraGroup(rank=0, world_size=1)
        self.run_dir = cfg.run_path
        torch.set_num_threads(cfg.threads)
        corpus = CorpusFiles(**json.loads((self.run_dir / CORPUS_FILE).read_text()))
        self.corpus = corpus
        self.metrics = MetricsWriter(metrics_path(self.run_dir, replica) if ranks.rank == 0
                                     else rank_metrics_path(self.run_dir, replica, ranks.rank))
        self.schedule = load_schedule(cfg.failures, replicas=cfg.replicas, steps=cfg.steps,
                                      hours=cfg.schedule_hours, seed=cfg.seed)
        self.restart_consumed = restart_consumed
        # in a group, an injected failure hits its last rank: one that does not talk to the lighthouse
        injected = ranks.rank == ranks.world_size - 1
        self.injector = Injector([parse_injection(s, cfg.replicas) for s in cfg.inject] if injected else [],
                                 replica, self.run_dir)

        self.device = replica_device(cfg, replica if device_index is None else device_index)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # NCCL communicators bind the current device
        self.backends = local_backends(self.device.type)  # gloo on CPU, NCCL with CUDA (mecefo.backends)
        self.policy = cfg.resolved_policy
        self.path = neighbor_path(self.policy, rank=cfg.rank, tau=cfg.tau, basis=cfg.basis)
        self.source = resolve_model_source(cfg, corpus_vocab=corpus.vocab,
                                           tokenised=corpus.tokenizer is not None)
        self.model_identity = json.loads((self.run_dir / MODEL_FILE).read_text())
        self.costs = work_costs(cfg, self.source)
        # how this group holds the model: whole on every rank, or FSDP2 shards (mecefo.sharding)
        self.holding = model_holding(cfg.shard, ranks, self.device, cfg.dtype, cfg.timeout_s)
        self.model = self.holding.wrap(self.path.prepare(build_model(cfg, self.device, self.source)))
        self.model.train()
        self.compute = compute_context(cfg, self.device)
        n_params = sum(p.numel() for p in self.model.parameters())
        self.hash_state = cfg.hash_state if cfg.hash_state is not None else n_params < HASH_STATE_MAX_PARAMS
        # a shard is grad_accum micro-batches: the data of a shard is drawn whole, run micro-batch by micro-batch
        self.batches = Batches(corpus, seq_len=cfg.seq_len, micro_batch=cfg.sequences_per_shard, seed=cfg.seed,
                               vocab_size=model_vocab(self.model) or corpus.vocab)
        if ranks.world_size > 1:  # a group shard is G data shards (mecefo.ranks)
            self.batches = GroupBatches(self.batches, ranks.world_size)
        self.optimizer = build_optimizer(self.model, cfg)
        self.sync = GradientSync(self.model, self.path.skipped_parameters(self.model),
                                 bucket_bytes=int(cfg.bucket_mb * (1 << 20)),
                                 wire_dtype=torch.bfloat16 if cfg.reduce_dtype == "bfloat16" else None)
        # the job's low-rank bases (the same on every replica: see mecefo.neighbor): the step they were
        # computed at, and whether the last committed step ran neighbour-mode work
        self.bases_step: int | None = None
        self.episode_open = False
        self.healed = False
        self.generation = generation
        # this launch's keys in the job's store (ledger, launch barrier): the supervisor's store outlives a job
        # restart, so they are the generation's; a group job's store serves one launch (mecefo.group)
        store_generation = generation if store_generation is None else store_generation
        self.lineage = ROOT_LINEAGE  # of the training state: extended by every commit (mecefo.fencing)
        self.dropped = 0  # sequences dropped at the last committed step (warn on change)
        self.guard = guard
        self.deadlines = Deadlines(cfg.timeout_s)
        self.replays = ReplayBudget(cfg.max_replays)
        # a state transfer's largest message: the largest tensor (parameters and AdamW moments share shapes)
        self.largest_message = max(p.numel() * p.element_size() for p in self.model.parameters())
        self.grad_bytes = sum(p.numel() * p.element_size() for _, p in self.sync.params)
        # the gradient noise scale (mecefo.noise): from all-reduced numbers only, so the same on every replica
        self.noise = NoiseScale(cfg.noise_ema)
        self.state_bytes_logged = False  # bytes this rank holds, recorded once its optimizer state exists

        self.membership = Membership(
            replica=replica, lighthouse=lighthouse, state_dict=self.state_dict,
            load_state_dict=self.load_state_dict, min_replicas=cfg.min_replicas, timeout_s=cfg.timeout_s,
            quorum_timeout_s=cfg.quorum_timeout_s, lighthouse_wait_s=cfg.lighthouse_wait_s,
            on_quorum=(lambda: self.injector.fire("quorum", self.membership.step)) if self._has("quorum") else None,
            on_send=self._on_send if self._has("send") else None,
            ledger=CommitLedger(JobStore(barrier, cfg.lighthouse_wait_s), store_generation) if barrier else None,
            group_store=group_store, group_rank=ranks.rank, group_world_size=ranks.world_size, advertise=advertise,
            backends=self.backends)
        if resume:
            self._resume()
        self.metrics.write(event="start", replica=replica, pid=os.getpid(), generation=generation, rejoin=rejoin,
                           step=self.membership.step, ready_time=time.time(), init_s=time.time() - start)
        if barrier and not rejoin:
            self._launch_barrier(barrier, store_generation, ranks=cfg.replicas * ranks.world_size)

    # ---- state: what a rejoining replica receives and a checkpoint holds ------------------------

    def state_dict(self) -> dict:
        step = self.membership.step
        has_bases = self.bases_step is not None
        return {**self.holding.transfer_state(self.model, self.optimizer),
                "bases": self.path.bases_state(self.model) if has_bases else {},
                "trainer": {"step": step, "data_position": step, "lr": lr_at(step, self.cfg),
                            "corpus": self.corpus.fingerprint, "model": self.model_identity, "bases_step": self.bases_step if has_bases else -1,
                            "episode_open": self.episode_open, "lineage": self.lineage,
                            "noise": self.noise.state_dict()}}

    def load_state_dict(self, state: dict) -> None:
        self._check_corpus(state)
        self.holding.load_transfer_state(self.model, self.optimizer, state)
        self._load_trainer_state(state)

    def _check_corpus(self, state: dict) -> None:
        trainer = state["trainer"]
        if trainer["corpus"] != self.corpus.fingerprint:
            raise RuntimeError(f"replica {self.replica}: received state trained on corpus {trainer['corpus'][:12]}, "
                               f"but this replica has corpus {self.corpus.fingerprint[:12]}")
        if trainer.get("model", self.model_identity) != self.model_identity:
            raise RuntimeError(f"replica {self.replica}: received state of model {trainer['model']}, but this replica "
                               f"trains {self.model_identity}")

    def _load_trainer_state(self, state: dict) -> None:
        """What a state holds besides the model and optimizer: lineage, bases, the failure episode."""
        trainer = state["trainer"]
        self.lineage = trainer.get("lineage", ROOT_LINEAGE)
        bases, bases_step = state.get("bases") or {}, trainer.get("bases_step", -1)
        if bases and bases_step >= 0:
            self.path.load_bases(self.model, bases)
            self.bases_step = bases_step
        else:  # none sent (no failure yet), or a checkpoint from before bases were saved: refreshed when needed
            self.bases_step = None
        self.episode_open = bool(trainer.get("episode_open", False))
        self.noise = NoiseScale(self.cfg.noise_ema)  # a checkpoint from before the estimate: it starts again
        if "noise" in trainer:
            self.noise.load_state_dict(trainer["noise"])
        self.healed = True

    def _resume(self) -> None:
        t0 = time.perf_counter()
        found = self.holding.load_latest(self.run_dir / CHECKPOINT_DIR, self.model, self.optimizer, warn=self._warn)
        if found is None:
            self._warn("no valid checkpoint to resume from: starting from step 0")
            return
        state, path = found  # the model and optimizer are loaded: the rest of the state
        self._check_corpus(state)
        self._load_trainer_state(state)
        self.membership.load_manager_state(state["manager"])
        self.healed = False
        self.metrics.write(event="resumed", replica=self.replica, step=self.membership.step, path=str(path),
                           lineage=self.lineage, seconds=time.perf_counter() - t0)

    def _warn(self, message: str) -> None:
        print(f"[replica {self.replica}] WARNING: {message}", file=sys.stderr, flush=True)
        self.metrics.write(event="warning", replica=self.replica, message=message)

    # ---- launch ---------------------------------------------------------------------------------

    def _launch_barrier(self, address: str, generation: int, ranks: int) -> None:
        """Wait until all ``ranks`` processes of this launch are up, so the first quorum holds them all
        (a group restarted later finds the count reached and passes at once)."""
        store = connect_store(address, self.cfg.quorum_timeout_s)
        key = f"launch/{generation}"
        store.add(key, 1)
        deadline = time.monotonic() + self.cfg.quorum_timeout_s
        while store.add(key, 0) < ranks:
            if time.monotonic() > deadline:
                raise TimeoutError(f"replica {self.replica}: not all {self.cfg.replicas} replicas ({ranks} processes) "
                                   f"started within {self.cfg.quorum_timeout_s} s")
            time.sleep(0.05)

    # ---- injection hooks ------------------------------------------------------------------------

    def _has(self, phase: str) -> bool:
        return any(i.phase == phase for i in self.injector.mine)

    def _on_send(self, sends: int) -> None:
        if sends == 3:  # metadata length, metadata, first tensor are out: mid-transfer
            self.injector.fire("send", self.membership.step)

    # ---- the loop -------------------------------------------------------------------------------

    def run(self) -> int:
        """Train until cfg.steps updates are committed; the exit code (0, or RESTART_EXIT_CODE)."""
        last_commit = time.perf_counter()
        while True:
            replay = self.replays.replay(self.membership.step)
            # until the plan is known (a heal happens inside the quorum): the floor, and the transfer's own
            self.membership.set_deadlines(self.deadlines.collective_s(0, 0, replay),
                                          self.deadlines.transfer_s(self.largest_message, replay))
            t0 = time.perf_counter()
            self.healed = False
            self.membership.start_quorum()
            timing = dict(quorum_s=time.perf_counter() - t0, quorum_end=time.time())
            step = self.membership.step
            if self.healed:
                self.metrics.write(event="healed", replica=self.replica, step=step, seconds=timing["quorum_s"])
            if step >= self.cfg.steps:
                break
            replay = self.replays.replay(step)
            taken_over = self.guard.taken_over() if self.guard is not None else None
            errored, replaced = self._group_flags(self.membership.errored(), taken_over is not None)
            if replaced:  # another process holds this group's index now: never post a gradient beside it
                raise Fenced(step, f"group {self.replica}'s index is held by {taken_over or 'another process'}: "
                                   "this process was replaced while it was paused or cut off")
            twins = self.membership.twins
            if twins or errored:  # no step: straight to the (refused) commit
                if twins:  # both holders' gradients would be summed while counted once: nobody trains this quorum
                    self.membership.report_error(f"group index {list(twins)} is held by two processes in this "
                                                 "quorum (a replaced group whose old holder still runs)")
                self.membership.abort()
                self.membership.commit()
                self._discard(step, timing["quorum_s"])
                continue
            self.membership.check_current()  # fencing: a replica behind and unhealed stops here
            self.injector.fire("step", step)
            if self.policy.restart and self._scheduled_restart(step):
                return RESTART_EXIT_CODE
            record = self._train_step(step, replay)
            if record is None:
                self._discard(step, timing["quorum_s"])
                continue
            now = time.perf_counter()
            step_s, last_commit = now - last_commit, now
            self.lineage = next_lineage(self.lineage, step, self.generation, self.membership.quorum_label)
            record.update(timing, step_s=step_s, tokens_per_s=record["tokens"] / step_s, attempts=replay + 1,
                          generation=self.generation, lineage=self.lineage)
            if self.hash_state:
                record.update(param_hash=parameter_hash(self.model), optim_hash=optimizer_hash(self.optimizer))
            if self.ranks.world_size > 1:
                record["group_rank"] = self.ranks.rank
            self.metrics.write(**record)
            if not self.state_bytes_logged:  # AdamW's state exists from the first update on
                self.state_bytes_logged = True
                self.metrics.write(event="state_bytes", replica=self.replica, rank=self.ranks.rank,
                                   generation=self.generation, shard=self.holding.name,
                                   group_size=self.ranks.world_size, **state_bytes(self.model, self.optimizer))
            if record["dropped_sequences"] and record["dropped_sequences"] != self.dropped:
                self._warn(f"step {step}: sequences dropped, too few replicas to take them over ({record['plan']})")
            self.dropped = record["dropped_sequences"]
            self._after_commit(self.membership.step, min(record["members"]))
        if self.replica == min(self.membership.members or (self.replica,)) and self._writes():
            self._evaluate(self.cfg.steps)
        return 0

    def _group_flags(self, *flags: bool) -> list[bool]:
        """Each flag, true if it is true on any rank of this group (all ranks then act alike: their
        intra-group collectives must match). A rank may still be waiting for the job store (every rank
        asks it, each on its own connection): the others wait as long as it may."""
        if self.ranks.world_size == 1:
            return list(flags)
        summed = torch.tensor([1.0 if f else 0.0 for f in flags])
        self.ranks.allreduce_sum(summed, timeout_s=self.cfg.timeout_s + self.cfg.lighthouse_wait_s)
        return [v > 0 for v in summed.tolist()]

    def _train_step(self, step: int, replay: int) -> dict | None:
        """Plan, forward/backward, gradient sync, commit: the committed step's record, or None if discarded.
        ``replay``: how many attempts of this step were discarded before (the deadlines grow with it)."""
        cfg = self.cfg
        members = self.membership.members
        failed = frozenset() if self.policy.restart else self.schedule.failed_among(step, members)
        penalty, drop_penalty, believed = self._auto_penalties()
        plan = plan_step(cfg.replicas, [r for r in members if r not in failed], self.policy,
                         sequences=self.batches.micro_batch, costs=self.costs, max_load=cfg.max_load,
                         penalty=penalty, drop_penalty=drop_penalty)
        group_items = items = plan.items_of(self.replica)
        load = plan.load(self.replica, self.costs)  # this group's work, in normal shards
        deadline_s = self.deadlines.collective_s(load, plan.step_time(self.costs), replay)
        self.membership.set_deadlines(deadline_s, self.deadlines.transfer_s(self.largest_message, replay))
        if self.ranks.world_size > 1:
            items = rank_items(items, self.ranks.rank, self.ranks.world_size)
        needs_bases = plan.runs_neighbour_mode()
        refreshed = False
        if refresh_due(step, needed=needs_bases, episode_open=self.episode_open, bases_step=self.bases_step,
                       tau=self.path.tau):
            refreshed = self.path.refresh(self.model, self.optimizer, basis_fn=self.holding.basis_function())
            self.bases_step = step

        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, shards = self.holding.run_work(self.model, self.path, self.batches, step, group_items, self.device,
                                                 micro_batch=cfg.micro_batch, compute=self.compute)
        compute_s = time.perf_counter() - t0

        t1 = time.perf_counter()
        contributes = bool(items)
        # summed: the global loss, the job's compute seconds per shard of work (the deadlines' unit), and the
        # noise scale's two local terms (mecefo.noise), set below
        stats = torch.tensor([loss_sum, shards, compute_s, load, 0.0, 0.0], dtype=torch.float64,
                             device=self.backends.device)
        if self.ranks.world_size > 1:
            # the group's sums first, on every rank whatever happens across groups next (the ranks'
            # intra-group collectives must match); then every rank sums its group's with the other groups'
            self.holding.reduce_in_group(self.sync, contributes)
            self.ranks.allreduce_sum(stats)
            contributes = True
        # the noise scale needs exact gradients: a step with neighbour-mode work leaves the estimate as it is
        measure_noise = not needs_bases
        m = self.batches.micro_batch
        if measure_noise:  # this replica's (group's, after the intra-group sum) gradient, before the all-reduce
            group_sequences = sum(item.sequences for item in group_items)
            group_sq = self.holding.grad_squared_norm(p for _, p in self.sync.params)
            stats[4:] = torch.tensor(local_terms(group_sq, group_sequences, m), dtype=torch.float64,
                                     device=stats.device)
        t_grad = time.perf_counter()
        ok = self.sync.reduce(self._allreduce_sum, contributes=contributes)
        grad_s = time.perf_counter() - t_grad
        ok = ok and self.membership.allreduce_sum(stats)
        global_sq = 0.0
        if ok:
            self.sync.normalise(plan.normalisers())
            # with measure_noise every parameter was divided by the same normaliser: the global mean gradient,
            # whose norm the clip computes anyway (before clipping)
            if cfg.clip > 0:
                global_sq = self.holding.clip_grad_norm_(self.model, cfg.clip) ** 2
            elif measure_noise:
                global_sq = self.holding.grad_squared_norm(p for _, p in self.sync.params)
        else:
            self.membership.abort()
        lr = lr_at(step, cfg)
        set_lr(self.optimizer, lr)
        sync_s = time.perf_counter() - t1

        if not self.membership.commit():
            return None
        self.optimizer.step()
        self.episode_open = needs_bases
        self.deadlines.observe_compute(stats[2].item(), stats[3].item())
        self.deadlines.observe_allreduce(self.grad_bytes, grad_s)
        processed = stats[1].item()  # the job's shards run this step, in group shards of G data shards each
        sample = estimate(stats[4].item(), stats[5].item(), processed * m, global_sq) if measure_noise else None
        if sample is not None:  # committed: every replica of the quorum updates the same averages
            self.noise.update(sample)
        return dict(step=step, replica=self.replica, policy=cfg.policy, plan_policy=plan.policy.name,
                    time=time.time(), loss=stats[0].item() / processed, lr=lr,
                    tokens=round(processed * self.ranks.world_size * cfg.tokens_per_shard), compute_s=compute_s,
                    sync_s=sync_s,
                    members=list(members), live=list(plan.live), scheduled_failed=sorted(failed),
                    neighbours={str(d): o[0] if len(o) == 1 else list(o) for d, o in plan.owners.items()},
                    dropped=list(plan.dropped), dropped_sequences=plan.dropped_sequences, plan=plan.describe(),
                    shards=list(plan.shards_of(self.replica)),
                    work=[[i.shard, i.start, i.stop, i.mode] for i in items],
                    neighbour=plan.is_neighbour(self.replica), neighbour_mode=plan.runs_neighbour_mode(self.replica),
                    predicted_step=plan.step_time(self.costs), bases_refreshed=refreshed, bases_step=self.bases_step,
                    quorum_id=self.membership.quorum_id, deadline_s=deadline_s, **self._noise_record(sample),
                    **({"auto_penalty": penalty, "auto_drop_penalty": drop_penalty, "auto_penalties": believed}
                       if self.policy.is_auto else {}))

    def _auto_penalties(self) -> tuple[float, float, str]:
        """(approximation penalty, drop penalty, where the drop penalty comes from) for this step's plan: with
        --auto-penalties live, the drop penalty the noise scale predicts at the full global batch once its
        averages are ready (the state every replica shares: plans stay a function of shared state)."""
        cfg = self.cfg
        if cfg.auto_penalties == "live":
            predicted = self.noise.drop_penalty(cfg.replicas * self.batches.micro_batch)
            if self.noise.ready and predicted is not None:
                return cfg.auto_penalty, predicted, "live"
            return cfg.auto_penalty, cfg.auto_drop_penalty, "fixed: noise scale not ready"
        return cfg.auto_penalty, cfg.auto_drop_penalty, "fixed"

    def _noise_record(self, sample) -> dict:
        """The step's noise-scale fields: its own estimates (None: not measured) and the averages after it."""
        batch = self.cfg.replicas * self.batches.micro_batch
        b_simple = self.noise.b_simple
        return dict(noise_grad_sq=sample.grad_sq if sample else None, noise_trace=sample.trace if sample else None,
                    noise_local_batch=sample.local_batch if sample else None, noise_batch=batch,
                    noise_b_simple=None if b_simple is None or b_simple == float("inf") else b_simple,
                    noise_drop_penalty=self.noise.drop_penalty(batch), noise_samples=self.noise.samples)

    def _allreduce_sum(self, tensor: torch.Tensor) -> bool:
        step = self.membership.step
        if self.injector.armed("allreduce", step):
            work = self.membership.post_allreduce_sum(tensor)
            self.injector.fire("allreduce", step)
            work.wait()
            return not self.membership.errored()
        return self.membership.allreduce_sum(tensor)

    def _discard(self, step: int, quorum_s: float) -> None:
        """Record a step whose commit was refused: no update; it is replayed from the next quorum.

        :class:`ReplaysExhausted` past ``--max-replays`` (a quorum below ``--min-replicas`` is waited out,
        not counted). A group whose step failed :data:`PROBE_AFTER` times in a row probes the other
        groups of the quorum; if it is the one cut off from them (:meth:`mecefo.group.GroupGuard.cut_off`),
        it leaves (:class:`CutOff`) so the job goes on.
        """
        too_few = self.membership.too_few()
        reason = self.membership.error() or ("too few replicas (--min-replicas)" if too_few else "a peer failed")
        self.metrics.write(event="discarded", replica=self.replica, step=step, time=time.time(),
                           quorum_s=quorum_s, reason=reason)
        if too_few and not self.membership.errored():
            return
        self.replays.discard(step, reason)
        if self.guard is not None and self.replays.discarded >= PROBE_AFTER:
            why = self.guard.cut_off(self.membership.members)
            (leave,) = self._group_flags(why is not None)
            if leave:
                raise CutOff(why or "another rank found this group cut off from the others")

    def _scheduled_restart(self, step: int) -> bool:
        if step in self.schedule.failure_starts() and step > self.restart_consumed:
            request = self.run_dir / RESTART_REQUEST_FILE
            tmp = request.with_name(f".{request.name}.{self.replica}")
            tmp.write_text(json.dumps({"step": step}))
            os.replace(tmp, request)
            self.metrics.write(event="restart_requested", replica=self.replica, step=step, time=time.time())
            return True
        return False

    def _writes(self) -> bool:
        """Whether this rank takes part in its group's checkpoints and evaluations (rank 0, or every rank of a
        sharded group)."""
        return self.ranks.rank == 0 or self.holding.collective_io

    def _after_commit(self, done: int, writer: int) -> None:
        """The writer (rank 0 of the lowest member of the step's quorum; every rank of it when sharded)
        checkpoints and evaluates."""
        cfg = self.cfg
        if self.replica != writer or not self._writes():
            return
        if done == cfg.steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
            state = self.state_dict()
            extra = {k: v for k, v in state.items() if k not in ("model", "optimizer")}
            extra["manager"] = self.membership.manager_state()
            try:
                saved = self.holding.save_checkpoint(self.run_dir / CHECKPOINT_DIR, done, self.model, self.optimizer,
                                                     extra, lineage=self.lineage)
            except ckpt.StaleCheckpointError as e:
                raise Fenced(done, str(e)) from None
            self.holding.prune_checkpoints(self.run_dir / CHECKPOINT_DIR, cfg.keep_checkpoints)
            if self.ranks.rank == 0:
                self.metrics.write(event="checkpoint", replica=self.replica, step=done, path=str(saved.path),
                                   bytes=saved.nbytes, seconds=saved.seconds)
        if done == cfg.steps:
            self._export(done)
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
            self._evaluate(done)

    def _export(self, done: int) -> None:
        """The trained model as a from_pretrained-loadable directory, RUN_DIR/final (mecefo.models.export_model)."""
        t0 = time.perf_counter()
        weights = self.holding.full_state_dict(self.model)  # sharded: gathered by every rank of the group
        if self.ranks.rank != 0:
            return
        out = export_model(weights, self.cfg, self.run_dir / FINAL_DIR, source=self.source, step=done,
                           lineage=self.lineage)
        self.metrics.write(event="export", replica=self.replica, step=done, path=str(out),
                           seconds=time.perf_counter() - t0)

    def _evaluate(self, done: int) -> None:
        t0 = time.perf_counter()
        val = evaluate(self.model, self.batches, self.cfg.eval_batches, micro_batch=self.cfg.micro_batch,
                       compute=self.compute)
        if self.ranks.rank != 0:
            return
        self.metrics.write(event="eval", replica=self.replica, step=done, val_loss=val,
                           val_ppl=float(torch.tensor(val).exp()), seconds=time.perf_counter() - t0)

    def save_resumable(self) -> Path | None:
        """A checkpoint of the committed state, for a run that ends without its lighthouse (rank 0 only; None
        when nothing was committed or a newer checkpoint, or one of another lineage, is already there)."""
        done = self.membership.step
        if self.ranks.rank != 0 or done == 0:
            return None
        state = self.state_dict()
        state["manager"] = self.membership.manager_state()
        try:
            saved = ckpt.save_checkpoint(self.run_dir / CHECKPOINT_DIR, done, state, lineage=self.lineage)
        except ckpt.StaleCheckpointError:
            return None
        self.metrics.write(event="checkpoint", replica=self.replica, step=done, path=str(saved.path),
                           bytes=saved.nbytes, seconds=saved.seconds)
        return saved.path

    def give_up(self, reason: str) -> None:
        """Record why this replica ends the run (the supervisor reports it)."""
        self.metrics.write(event="gave_up", replica=self.replica, step=self.membership.step, reason=reason)

    def report_fenced(self, fenced: Fenced) -> None:
        self._warn(f"fenced at step {fenced.step}, exiting without applying or writing anything: {fenced.reason}")
        self.metrics.write(event="fenced", replica=self.replica, step=fenced.step, reason=fenced.reason,
                           generation=self.generation)

    def shutdown(self) -> None:
        self.membership.shutdown()
        self.metrics.close()


def die_with(parent: int) -> None:
    """SIGKILL this process when its launcher ``parent`` dies (Linux), so no replica outlives a killed
    launcher (mecefo's supervisor, or torchrun's agent)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the line above
        sys.exit(f"launcher {parent} is gone")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mecefo.replica", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--replica", type=int, required=True)
    parser.add_argument("--lighthouse", required=True)
    parser.add_argument("--barrier", help="the job's store (HOST:PORT): launch barrier and commit ledger")
    parser.add_argument("--generation", type=int, default=0)
    parser.add_argument("--rejoin", action="store_true", help="a restarted replica: heal from the live ones")
    parser.add_argument("--resume", action="store_true", help="start from the newest valid checkpoint")
    parser.add_argument("--restart-consumed", type=int, default=-1,
                        help="policy restart: scheduled failures up to this step already caused a restart")
    parser.add_argument("--supervisor-pid", type=int, help="exit when this process (the launcher) dies")
    parser.add_argument("--group-store", metavar="HOST:PORT",
                        help="a replica group of --group-size ranks: the group's store (hosted by the launcher)")
    parser.add_argument("--group-rank", type=int, default=0, help="this process's rank in its replica group")
    args = parser.parse_args(argv)
    if args.supervisor_pid:
        die_with(args.supervisor_pid)
    cfg = TrainConfig.load(Path(args.run_dir) / "config.json")
    replica = None
    try:
        ranks, device_index = None, None
        if args.group_store:  # one rank of a group of cfg.group_size ranks (mecefo.ranks)
            from torch.distributed import PrefixStore

            store = connect_store(args.group_store, cfg.quorum_timeout_s)
            ranks = IntraGroup.connect(PrefixStore("mecefo/intra", store), args.group_rank, cfg.group_size,
                                       cfg.timeout_s)
            device_index = args.replica * cfg.group_size + args.group_rank
        replica = Replica(cfg, args.replica, lighthouse=args.lighthouse, barrier=args.barrier,
                          generation=args.generation, rejoin=args.rejoin, resume=args.resume,
                          restart_consumed=args.restart_consumed, ranks=ranks, group_store=args.group_store,
                          device_index=device_index)
        return replica.run()
    except Fenced as e:
        replica.report_fenced(e)
        return FENCED_EXIT_CODE
    except ReplaysExhausted as e:
        replica.give_up(str(e))
        print(f"mecefo-replica: replica {args.replica}: {e}", file=sys.stderr, flush=True)
        return GAVE_UP_EXIT_CODE
    except GroupFailed as e:  # the launcher restarts the group as a whole
        from .group import EXIT_GROUP_FAILED

        print(f"replica {args.replica}: {e}", file=sys.stderr, flush=True)
        return EXIT_GROUP_FAILED
    finally:
        if replica is not None:
            replica.shutdown()


if __name__ == "__main__":
    sys.exit(main())
