"""``mecefo-group`` (``python -m mecefo.group``): one rank of a replica group, started by torchrun or srun.

A multi-host job is a lighthouse (``mecefo-lighthouse``) and ``--groups N`` replica groups of G
ranks each; group ``I`` is started on its host(s) by::

    torchrun --nnodes 1 --nproc-per-node G --master-addr HOST --master-port PORT \\
        -m mecefo.group --lighthouse LH_HOST:LH_PORT --group I --groups N --run-dir DIR [training options]

(or ``srun`` with one task per rank, MASTER_ADDR and MASTER_PORT exported). Each rank reads its
place from the environment: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (torchrun),
else SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID with MASTER_ADDR and MASTER_PORT. Nothing else is
assumed about addresses: the lighthouse and job store come from ``--lighthouse`` / ``--job-store``,
what this group's servers bind and advertise from ``--advertise`` (default MASTER_ADDR).

Start-up, before training:

1. the lighthouse and the job store must answer within ``--connect-timeout`` seconds, else a
   one-line error names the address;
2. the group's rank 0 hosts a fresh store for this attempt (torchrun's own store would hold the
   previous attempt's keys after a restart) and publishes its address through MASTER_ADDR:MASTER_PORT
   (torchrun's store, or one rank 0 hosts there under srun); the ranks build the group's gloo group;
3. rank 0 prepares the corpus and is admitted to the job through the job store: its
   configuration (model, data, batch, policy, optimizer, ranks per group; not paths or thread
   counts) must equal the one the first group registered; a job whose ledger has committed steps
   must have a running group to heal from, else only a group started with ``--resume`` from a
   checkpoint the ledger has not passed may start (:func:`check_start`); no live process may hold
   its group index (:class:`GroupLease`); and a group joining a running job must reach the running
   groups first. Otherwise every rank exits with a one-line error (2). Admitted, it learns the job's
   launch generation (:func:`launch_generation`) and writes the run
   directory's config.json and corpus.json.

Then the group trains as one replica of the job (:mod:`mecefo.replica`, :mod:`mecefo.ranks`),
checking after every quorum that it still holds its index (:class:`GroupGuard`). Exit codes: 0 the
job's last step is committed; 1 the group stopped: a rank of this group is gone (the group must be
restarted as a whole: torchrun ``--max-restarts`` does it), it is cut off from the other groups, one
step failed more than ``--max-replays`` times, or the lighthouse and job store did not answer for
``--lighthouse-wait`` (then rank 0 leaves a checkpoint to ``--resume`` from); 2 bad configuration, or
nothing to start from; 76 fenced (behind the job, or replaced by another process holding its index).
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .command import EXIT_USAGE, OneLineErrors
from .config import TrainConfig, add_train_arguments, config_from_args
from .failures import parse_injection
from .jobstore import GENERATION_KEY as JOB_GENERATION_KEY, IDENTITY_KEY, LEDGER_GENERATION, ControlPlaneLost, JobStore, group_key, ledger_key

EXIT_GROUP_FAILED = 1  # a rank of this group is gone: restart the whole group
# TrainConfig fields a group may set for itself: where it writes, its threads, how it is supervised
# and where the model and data come from: they are compared by content (job_identity: the model's identity,
# the corpus's tokens' fingerprint)
LOCAL_FIELDS = frozenset({"run_dir", "cache_dir", "data", "model", "threads", "resume", "max_wall_s", "inject",
                          "restart_after", "max_restarts", "hash_state", "max_replays", "lighthouse_wait_s",
                          "tokenizer", "text_field", "tokenize_workers"})
SETUP_KEY = "mecefo/setup"  # in the group's store: rank 0's verdict on the start-up, for the other ranks
REJOIN_KEY = "mecefo/rejoin"  # in the group's store: "1" when the group joins a running job (no barrier)
OWNER_KEY = "mecefo/owner"  # in the group's store: the lease holder the group's ranks belong to
PROBE_S = 1.0  # a group whose address does not accept a connection within this long is unreachable
GENERATION_KEY = "mecefo/generation"  # in the group's store: the job's launch generation, for the other ranks


class AdmissionError(RuntimeError):
    """This group may not join the job (a one-line reason)."""


@dataclass(frozen=True)
class RankPlace:
    """Where this process sits, from torchrun's or Slurm's environment."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    attempt: int  # torchrun's restart count (0 under srun: a new srun is a new group)
    under_torchrun: bool


def rank_place(env: dict[str, str] | None = None) -> RankPlace:
    """This rank's place (torchrun's RANK/WORLD_SIZE/LOCAL_RANK, else srun's SLURM_PROCID/SLURM_NTASKS/
    SLURM_LOCALID; MASTER_ADDR and MASTER_PORT either way); ValueError naming what is missing."""
    env = os.environ if env is None else env
    if "RANK" in env:
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    elif "SLURM_PROCID" in env:
        names = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
    else:
        raise ValueError("neither RANK (torchrun) nor SLURM_PROCID (srun) is set: start mecefo.group with "
                         "torchrun or srun, one process per rank")
    missing = [n for n in (*names, "MASTER_ADDR", "MASTER_PORT") if not env.get(n)]
    if missing:
        raise ValueError(f"{', '.join(missing)} not set: torchrun sets them; under srun export MASTER_ADDR "
                         "(the group's first host) and MASTER_PORT")
    try:
        rank, world_size, local_rank, port = (int(env[n]) for n in (*names, "MASTER_PORT"))
    except ValueError:
        raise ValueError(f"{', '.join(names)} and MASTER_PORT must be integers") from None
    if not 0 <= rank < world_size:
        raise ValueError(f"{names[0]}={rank} is not in [0, {names[1]}={world_size})")
    return RankPlace(rank, world_size, local_rank, env["MASTER_ADDR"], port,
                     int(env.get("TORCHELASTIC_RESTART_COUNT", "0")), "TORCHELASTIC_RUN_ID" in env)


def wait_reachable(address: str, what: str, option: str, timeout_s: float) -> None:
    """Return once ``address`` (HOST:PORT) accepts a TCP connection; AdmissionError after ``timeout_s``."""
    from .quorum import split_address

    host, port = split_address(address, option)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, port), timeout=1.0).close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise AdmissionError(f"cannot reach the {what} at {host}:{port} within {timeout_s:g} s "
                                     f"({e.strerror or e}; {option}): is mecefo-lighthouse running there and "
                                     "reachable from this host?") from None
            time.sleep(0.2)


def job_identity(cfg: TrainConfig, corpus_fingerprint: str, ranks_per_group: int, model: dict | None = None) -> dict:
    """What every group of one job must agree on (:data:`LOCAL_FIELDS` excluded; the model by its identity,
    :func:`mecefo.models.model_identity`)."""
    # group_size is ranks_per_group (WORLD_SIZE), named by its torchrun / srun option in a refusal
    identity = {k: v for k, v in asdict(cfg).items() if k not in LOCAL_FIELDS and k != "group_size"}
    identity.update(corpus=corpus_fingerprint, ranks_per_group=ranks_per_group, model=model)
    return json.loads(json.dumps(identity))  # tuples as lists: equal to what comes back from the store


_IDENTITY_OPTIONS = {"corpus": "--data", "model": "--model", "ranks_per_group": "--nproc-per-node / WORLD_SIZE", "replicas": "--groups",
                     "timeout_s": "--timeout", "heartbeat_timeout_s": "--heartbeat-timeout",
                     "quorum_timeout_s": "--quorum-timeout"}


def check_same_job(store, identity: dict, group: int) -> None:
    """Register ``identity`` as the job's if it is the first; AdmissionError naming every difference if
    the job's differs."""
    mine = json.dumps(identity, sort_keys=True)
    stored = store.compare_set(IDENTITY_KEY, "", mine).decode()
    if stored == mine:
        return
    theirs = json.loads(stored)
    diffs = []
    for key in sorted(set(identity) | set(theirs)):
        if identity.get(key) != theirs.get(key):
            option = _IDENTITY_OPTIONS.get(key, "--" + key.replace("_", "-"))
            here, there = identity.get(key), theirs.get(key)
            if key == "corpus":
                here, there = str(here)[:12], str(there)[:12]
            if key == "model":  # its identity (mecefo.models.model_identity): architecture, config, weights
                here, there = (", ".join(f"{k} {v}" for k, v in (m or {}).items()) for m in (here, there))
            diffs.append(f"{key} {here!r} here, {there!r} in the job ({option})")
    raise AdmissionError(f"group {group} does not match the job it joins: {'; '.join(diffs)}")


class GroupLease:
    """Which process holds group index ``group`` of the job: keys ``group/<I>/owner`` and ``group/<I>/beat``
    in the job store (and ``group/<I>/address``, where its rank 0 accepts connections).

    The holder bumps ``beat`` every :attr:`BEAT_S` seconds, through store outages (a restarted
    lighthouse, a network cut). A process claiming an index with an owner watches the beat for
    :attr:`WATCH_S`: if it moves, the owner is alive and the claim is refused (two groups started with
    the same ``--group``); if not, the owner is gone (the group is being restarted, or its host is
    paused or cut off) and the index is taken over. A holder that was taken over finds out after its
    next quorum (:meth:`GroupGuard.taken_over`) and is fenced before it posts a gradient.
    """

    BEAT_S = 0.25
    WATCH_S = 1.5

    def __init__(self, store_address: str, group: int, owner: str, wait_s: float):
        self.group = group
        self.owner = f"{owner} [{uuid.uuid4().hex[:8]}]"
        self._address = store_address
        self._store = JobStore(store_address, wait_s)
        self._stop = threading.Event()
        self._beating: threading.Thread | None = None

    def _key(self, name: str) -> str:
        return group_key(self.group, name)

    def acquire(self, address: str) -> None:
        """Hold the index (and keep holding it from a daemon thread), advertising ``address`` (HOST:PORT where
        this group accepts connections); AdmissionError if a live process holds it."""
        store = self._store
        previous = store.get_or(self._key("owner"), "")
        if previous:
            before = store.add(self._key("beat"), 0)
            time.sleep(self.WATCH_S)
            if store.add(self._key("beat"), 0) != before:
                raise AdmissionError(f"group {self.group} is already running ({previous}): two groups were "
                                     f"started with --group {self.group}")
        if store.compare_set(self._key("owner"), previous, self.owner).decode() != self.owner:
            raise AdmissionError(f"group {self.group} was claimed by another process at the same time: two groups "
                                 f"were started with --group {self.group}")
        store.set(self._key("address"), address)
        self._beating = threading.Thread(target=self._beat, name=f"group-{self.group}-lease", daemon=True)
        self._beating.start()

    def _beat(self) -> None:
        store = JobStore(self._address, wait_s=4 * self.BEAT_S)  # its own connection: the main one is not shared
        while not self._stop.wait(self.BEAT_S):
            try:
                store.add(self._key("beat"), 1)
            except ControlPlaneLost:  # the store is gone for now: keep trying, it may come back
                pass

    def release(self) -> None:
        """Stop beating (the index is free once a successor has watched the beat stand still)."""
        self._stop.set()
        if self._beating is not None:
            self._beating.join(timeout=5)


def live_groups(store: JobStore, groups: int, exclude: int) -> list[int]:
    """Group indices other than ``exclude`` whose holder's beat moves (watched for GroupLease.WATCH_S)."""
    before = [store.add(group_key(g, "beat"), 0) for g in range(groups)]
    time.sleep(GroupLease.WATCH_S)
    return [g for g in range(groups) if g != exclude and store.add(group_key(g, "beat"), 0) != before[g]]


def committed_steps(store: JobStore) -> int:
    """How many steps the job's ledger holds (steps 0 .. n-1 are committed; found in O(log n) look-ups)."""
    def done(step: int) -> bool:
        return store.check([ledger_key(LEDGER_GENERATION, step)])

    if not done(0):
        return 0
    high = 1
    while done(high):
        high *= 2
    low = high // 2  # done(low), not done(high)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if done(mid) else (low, mid)
    return high


def check_start(store: JobStore, group: int, groups: int, resume: bool, checkpoint_step: int | None) -> list[int]:
    """Whether this group may start, and how: the running groups when it joins a running job (it heals from
    them, no launch barrier), [] when it starts the job (fresh, or from its checkpoint). AdmissionError when
    the job has committed steps that no running group holds and this group cannot continue from them."""
    committed = committed_steps(store)
    if committed == 0:
        return []
    running = live_groups(store, groups, group)
    if running:
        return running
    if not resume:
        raise AdmissionError(f"the job has committed {committed} steps (the lighthouse's ledger) and no group is "
                             f"running to heal from: group {group} was started without --resume and would train "
                             "from step 0; start every group with --resume to continue from the newest checkpoint")
    if checkpoint_step is None or checkpoint_step < committed:
        found = "none" if checkpoint_step is None else f"step {checkpoint_step}"
        raise AdmissionError(f"--resume: the newest checkpoint here is {found}, but the job's ledger has committed "
                             f"{committed} steps and no group is running that holds them; to redo the steps since "
                             "the checkpoint start a fresh lighthouse (a new --state-dir)")
    return []


def leaves(members: Iterable[int], me: int, unreachable: Iterable[int]) -> bool:
    """Whether group ``me`` is the side of a split quorum that leaves: it reaches (itself included) at most
    half of the quorum's groups, and exactly half only when the lowest index is on the other side. Every
    side computes the same split from the same quorum, so at most one side of a two-way split stays."""
    members = set(members)
    reach = members - set(unreachable)
    if 2 * len(reach) > len(members):
        return False
    return 2 * len(reach) < len(members) or min(members) not in reach


def _answers(address: str) -> bool:
    from .quorum import split_address

    host, port = split_address(address, "group address")
    try:
        socket.create_connection((host, port), timeout=PROBE_S).close()
        return True
    except OSError:
        return False


class GroupGuard:
    """A group's checks besides torchft's quorum, asked by :class:`mecefo.replica.Replica` on every rank (so
    that all ranks wait on the job store alike): whether the group's index was taken over from ``owner`` (the
    lease holder this process belongs to), and whether the group is the one cut off from the others."""

    def __init__(self, owner: str, store: JobStore, group: int):
        self.owner = owner
        self.store = store
        self.group = group

    def taken_over(self) -> str | None:
        """The process now holding this group's index if it is not this group's lease holder (None: still held)."""
        owner = self.store.get_or(group_key(self.group, "owner"), "")
        return None if owner == self.owner else owner or "nobody"

    def unreachable(self, groups: Iterable[int]) -> list[int]:
        """Which of ``groups`` do not accept a connection at their advertised address (probed together)."""
        groups = sorted(set(groups) - {self.group})
        addresses = [self.store.get_or(group_key(g, "address")) for g in groups]
        with ThreadPoolExecutor(max_workers=max(1, min(32, len(groups)))) as pool:
            answers = list(pool.map(lambda a: a is not None and _answers(a), addresses))
        return [g for g, ok in zip(groups, answers) if not ok]

    def cut_off(self, members: Iterable[int]) -> str | None:
        """Why this group should leave the job (:func:`leaves`), or None."""
        members = sorted(set(members))
        unreachable = self.unreachable(members)
        if not leaves(members, self.group, unreachable):
            return None
        return (f"group {self.group} cannot reach groups {unreachable} of its quorum {members} though the lighthouse "
                "answers: leaving the job so that it goes on without this group; start it again once the network "
                "is back (it waits until it reaches the running groups, then heals)")

    def wait_reachable(self, groups: Iterable[int], timeout_s: float) -> None:
        """Before joining a running job: AdmissionError unless every one of ``groups`` answers within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while unreachable := self.unreachable(groups):
            if time.monotonic() > deadline:
                where = ", ".join(f"{g} at {self.store.get_or(group_key(g, 'address'), '?')}" for g in unreachable)
                raise AdmissionError(f"group {self.group} cannot reach the running groups ({where}) within "
                                     f"{timeout_s:g} s (--connect-timeout): is the network between the groups up?")
            time.sleep(PROBE_S / 2)


def launch_generation(job_store, run_dir: Path) -> int:
    """The launch generation of the job this group joins (a :class:`mecefo.jobstore.JobStore`, or any store
    with compare_set; the group's run directory).

    The first group admitted through a job store fixes it: one past the newest generation in its run
    directory's records (0 in a new one); every later group, of this launch or restarted into it, takes
    it from the store (key ``job/generation``: a lighthouse restarted from its state must keep it). So a
    job resumed with a fresh lighthouse (README: "Checkpoints") is a new generation, as a relaunch of the
    single-host launcher is: its records and lineage are told apart from the copies of the steps it
    redoes that the interrupted launch left, and the report keeps the newest. The store's own keys
    (ledger, launch barrier) need no generation: a job store serves one launch (they stay under 0).
    """
    from .report import newest_generation, read_metrics

    newest = newest_generation(read_metrics(run_dir))
    proposal = "0" if newest is None else str(newest + 1)
    return int(job_store.compare_set(JOB_GENERATION_KEY, "", proposal).decode())


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_group_run_dir(cfg: TrainConfig, corpus, model: dict) -> None:
    """The run directory's config.json, corpus.json and model.json (several groups may share the directory:
    written atomically; an existing run is joined, not refused)."""
    from .replica import CORPUS_FILE, MODEL_FILE

    cfg.run_path.mkdir(parents=True, exist_ok=True)
    _write_atomic(cfg.run_path / "config.json", cfg.to_json() + "\n")
    _write_atomic(cfg.run_path / CORPUS_FILE, json.dumps(corpus.as_dict(), indent=2) + "\n")
    _write_atomic(cfg.run_path / MODEL_FILE, json.dumps(model, indent=2) + "\n")


def _parser() -> OneLineErrors:
    parser = OneLineErrors(prog="mecefo-group", description=__doc__.splitlines()[0])
    g = parser.add_argument_group("replica group")
    g.add_argument("--lighthouse", required=True, metavar="HOST:PORT", help="mecefo-lighthouse's address")
    g.add_argument("--job-store", metavar="HOST:PORT", help="the job store (default: the lighthouse's port + 1)")
    g.add_argument("--group", type=int, required=True, help="this group's index, 0 .. GROUPS-1 (its shard)")
    g.add_argument("--groups", type=int, required=True, help="replica groups in the job (the job's --replicas)")
    g.add_argument("--advertise", metavar="HOST",
                   help="the address this group's servers bind and other hosts reach them at (default: "
                        "MASTER_ADDR); gloo picks its interface from GLOO_SOCKET_IFNAME (set to lo for a "
                        "loopback address)")
    g.add_argument("--connect-timeout", type=float, default=60.0,
                   help="seconds to wait for the lighthouse, the job store and the group's ranks (default "
                        "%(default)s)")
    add_train_arguments(parser, TrainConfig(run_dir="runs/group"))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    args = parser.parse_args(argv)
    if any(a == "--replicas" or a.startswith("--replicas=") for a in argv):
        parser.error("argument --replicas: a group job has --groups replicas")
    if args.groups < 1 or not 0 <= args.group < args.groups:
        parser.error(f"argument --group: must be in [0, --groups {args.groups}), got {args.group}")
    if not args.connect_timeout > 0:
        parser.error(f"argument --connect-timeout: must be > 0, got {args.connect_timeout}")
    args.replicas = args.groups
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        parser.config_error(e)
    if cfg.resolved_policy.restart:
        parser.error("argument --policy: restart (checkpoint-restart of the whole job) needs the single-host "
                     "launcher, mecefo-train; a group job restarts groups, not the job")
    for spec in cfg.inject:
        try:
            injection = parse_injection(spec, cfg.replicas)
        except ValueError as e:
            parser.error(str(e))
        if injection.action == "hang":  # SIGSTOPped, it would wait for a supervisor to SIGCONT it
            parser.error(f"--inject {spec!r}: hang needs the single-host launcher, which wakes the hung process; "
                         "a group job takes kill only")
    try:
        place = rank_place()
    except ValueError as e:
        parser.error(str(e))
    if any(a == "--group-size" or a.startswith("--group-size=") for a in argv) and cfg.group_size != place.world_size:
        parser.error(f"argument --group-size: {cfg.group_size}, but this group has {place.world_size} ranks "
                     "(WORLD_SIZE / SLURM_NTASKS): a group's size is its number of processes")
    cfg = replace(cfg, group_size=place.world_size)
    advertise = args.advertise or place.master_addr
    if _is_loopback(advertise):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("RUST_LOG", "warn")
    from .lighthouse import job_store_address

    try:
        job_store = args.job_store or job_store_address(args.lighthouse)
        lighthouse = args.lighthouse if args.lighthouse.startswith("http://") else f"http://{args.lighthouse}"
        wait_reachable(lighthouse, "lighthouse", "--lighthouse", args.connect_timeout)
        wait_reachable(job_store, "job store", "--job-store", args.connect_timeout)
    except (ValueError, AdmissionError) as e:
        parser.error(str(e))
    return _run_group(parser, cfg, args, place, lighthouse=lighthouse, job_store=job_store, advertise=advertise)


def _run_group(parser, cfg: TrainConfig, args, place: RankPlace, *, lighthouse: str, job_store: str,
               advertise: str) -> int:
    from torch.distributed import PrefixStore

    from .checkpoint import list_checkpoints
    from .data import check_length, prepare_corpus
    from .deadlines import CutOff, ReplaysExhausted
    from .fencing import FENCED_EXIT_CODE, Fenced
    from .models import check_model
    from .quorum import BoundStore, connect_store
    from .ranks import GroupFailed, IntraGroup
    from .replica import CHECKPOINT_DIR, Replica, die_with
    from .sharded_checkpoint import check_resume_format, list_sharded

    if place.under_torchrun:  # a rank outliving its torchrun agent would hold the group index for nobody
        die_with(os.getppid())
    timeout_s = args.connect_timeout
    # the rendezvous: MASTER_ADDR:MASTER_PORT is torchrun's store, or one rank 0 hosts there under srun
    bootstrap_host = None if place.under_torchrun or place.rank != 0 else BoundStore(place.master_addr,
                                                                                    place.master_port)
    bootstrap = bootstrap_host.store if bootstrap_host else connect_store(
        f"{place.master_addr}:{place.master_port}", timeout_s)
    key = f"mecefo/attempt/{place.attempt}/group_store"
    group_store = BoundStore(advertise) if place.rank == 0 else None  # this attempt's, fresh
    if group_store is not None:
        bootstrap.set(key, group_store.address)
    store_address = bootstrap.get(key).decode()
    # the other ranks wait here while rank 0 prepares the corpus (a first build can take a while)
    store = connect_store(store_address, max(timeout_s, cfg.quorum_timeout_s))
    ranks = IntraGroup.connect(PrefixStore("mecefo/intra", store), place.rank, place.world_size, cfg.timeout_s)

    lease = guard = None
    if place.rank == 0:
        try:
            corpus = prepare_corpus(cfg.data, cache_dir=cfg.cache_dir, val_percent=cfg.val_percent,
                                    data_dtype=cfg.data_dtype, tokenizer=cfg.tokenizer, text_field=cfg.text_field,
                                    workers=cfg.tokenize_workers, progress=True)
            check_length(corpus, cfg.seq_len)
            if cfg.resume:
                check_resume_format(cfg.run_path / CHECKPOINT_DIR, cfg.shard)
            model = check_model(cfg, corpus)
            job = JobStore(job_store, timeout_s)
            check_same_job(job, job_identity(cfg, corpus.fingerprint, place.world_size, model), args.group)
            # the newest checkpoint of this run's format: whole-state files, or sharded directories (--shard fsdp)
            listing = list_sharded if cfg.shard == "fsdp" else list_checkpoints
            newest = listing(cfg.run_path / CHECKPOINT_DIR) if cfg.resume else []
            running = check_start(job, args.group, cfg.replicas, cfg.resume, newest[0][0] if newest else None)
            lease = GroupLease(job_store, args.group, f"{socket.gethostname()} pid {os.getpid()} at {advertise}",
                               cfg.lighthouse_wait_s)
            lease.acquire(group_store.address)
            guard = GroupGuard(lease.owner, JobStore(job_store, cfg.lighthouse_wait_s), args.group)
            if running:  # join only once the running groups can be reached (else it would fail their steps)
                guard.wait_reachable(running, timeout_s)
            generation = launch_generation(job, cfg.run_path)
            write_group_run_dir(cfg, corpus, model)  # admitted: nothing is written by a group that is refused
        except (ValueError, OSError, ImportError, AdmissionError, ControlPlaneLost) as e:
            if lease is not None:
                lease.release()
            store.set(SETUP_KEY, str(e) or type(e).__name__)
            if isinstance(e, ValueError):
                parser.config_error(e)  # names the option when the error names its field
            parser.error(str(e))
        store.set(REJOIN_KEY, "1" if running or place.attempt > 0 else "")
        store.set(OWNER_KEY, lease.owner)
        store.set(GENERATION_KEY, str(generation))
        store.set(SETUP_KEY, "")
    elif store.get(SETUP_KEY).decode():  # rank 0 said why on the console
        return EXIT_USAGE
    else:
        guard = GroupGuard(store.get(OWNER_KEY).decode(), JobStore(job_store, cfg.lighthouse_wait_s), args.group)
        generation = int(store.get(GENERATION_KEY).decode())

    replica = None
    try:
        replica = Replica(cfg, args.group, lighthouse=lighthouse, barrier=job_store, ranks=ranks,
                          group_store=store_address, advertise=advertise, device_index=place.local_rank,
                          generation=generation, store_generation=LEDGER_GENERATION,
                          rejoin=bool(store.get(REJOIN_KEY).decode()), resume=cfg.resume, guard=guard)
        return replica.run()
    except Fenced as e:
        replica.report_fenced(e)
        return FENCED_EXIT_CODE
    except (GroupFailed, TimeoutError, CutOff) as e:
        print(f"mecefo-group: group {args.group}: {e}", file=sys.stderr, flush=True)
        return EXIT_GROUP_FAILED
    except (ControlPlaneLost, ReplaysExhausted) as e:  # the job cannot go on: leave a checkpoint to resume from
        saved = replica.save_resumable() if replica is not None else None
        then = f"; checkpoint {saved} (restart with --resume)" if saved else ""
        print(f"mecefo-group: group {args.group}: rank {place.rank}: {e}{then}", file=sys.stderr, flush=True)
        return EXIT_GROUP_FAILED
    finally:
        if replica is not None:
            replica.shutdown()
        if lease is not None:
            lease.release()


if __name__ == "__main__":
    sys.exit(main())
