"""Replica groups' pieces without processes: work split over ranks, a group shard's data, where a rank
sits, admission to a job (configuration, group index) and the commands' one-line errors."""

import pytest
import torch

from mecefo.config import TrainConfig
from mecefo.data import Batches, prepare_corpus
from mecefo.group import AdmissionError, GroupLease, check_same_job, job_identity, main, rank_place
from mecefo.jobstore import READY_KEY
from mecefo.lighthouse import job_store_address
from mecefo.lighthouse import main as lighthouse_main
from mecefo.membership import WorkItem, plan_step
from mecefo.quorum import LoopbackStore
from mecefo.ranks import GroupBatches, rank_items


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_rank_items_cut_every_item_into_contiguous_pieces(world):
    items = (WorkItem(0, 0, 4), WorkItem(3, 1, 4, "neighbour"), WorkItem(2, 0, 1))
    pieces = [rank_items(items, r, world) for r in range(world)]
    for item in items:
        mine = [p for rank in pieces for p in rank if p.shard == item.shard]
        assert [(p.start, p.stop) for p in mine] == [(a, b) for a, b in zip([item.start] + [p.stop for p in mine[:-1]],
                                                                            [p.stop for p in mine])]
        assert mine[0].start == item.start and mine[-1].stop == item.stop and all(p.mode == item.mode for p in mine)
    sizes = [sum(p.sequences for p in rank) for rank in pieces]
    assert max(sizes) - min(sizes) <= len(items), "balanced up to one sequence per item"
    with pytest.raises(ValueError, match="rank must be in"):
        rank_items(items, world, world)


def test_a_group_shard_is_its_ranks_data_shards_end_to_end(corpus_cache):
    corpus = prepare_corpus(["stdlib"], cache_dir=corpus_cache)
    data = Batches(corpus, seq_len=8, micro_batch=2, seed=3, vocab_size=256)
    group = GroupBatches(data, 3)
    assert group.micro_batch == 6
    x, y = group.batch(5, 1)
    assert torch.equal(x, torch.cat([data.batch(5, s)[0] for s in (3, 4, 5)]))
    assert torch.equal(y, torch.cat([data.batch(5, s)[1] for s in (3, 4, 5)]))
    assert torch.equal(group.batch(5, 1, 1, 4)[0], x[1:4])
    with pytest.raises(ValueError, match="within the group shard's 6 sequences"):
        group.batch(5, 1, 0, 7)


def test_a_groups_plan_is_the_replicas_plan_on_group_shards():
    """With a group down, its shard of G*m sequences goes to the neighbour group, whose ranks split both."""
    plan = plan_step(3, [0, 2], "ndb-exact", sequences=4)
    assert [rank_items(plan.items_of(2), r, 2) for r in range(2)] == [
        [WorkItem(2, 0, 2), WorkItem(1, 0, 2)], [WorkItem(2, 2, 4), WorkItem(1, 2, 4)]]
    assert plan.normalisers().rest == 3


def test_rank_place_reads_torchrun_or_srun():
    torchrun = dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="10.0.0.7", MASTER_PORT="29400",
                    TORCHELASTIC_RUN_ID="x", TORCHELASTIC_RESTART_COUNT="2")
    place = rank_place(torchrun)
    assert (place.rank, place.world_size, place.local_rank, place.master_addr, place.master_port, place.attempt,
            place.under_torchrun) == (1, 2, 1, "10.0.0.7", 29400, 2, True)
    srun = dict(SLURM_PROCID="3", SLURM_NTASKS="4", SLURM_LOCALID="1", MASTER_ADDR="n1", MASTER_PORT="1")
    assert rank_place(srun).rank == 3 and not rank_place(srun).under_torchrun
    with pytest.raises(ValueError, match="neither RANK"):
        rank_place({})
    with pytest.raises(ValueError, match="MASTER_ADDR, MASTER_PORT not set"):
        rank_place(dict(SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_LOCALID="0"))
    with pytest.raises(ValueError, match=r"RANK=2 is not in \[0, WORLD_SIZE=2\)"):
        rank_place({**torchrun, "RANK": "2"})


def test_a_group_joins_only_a_job_of_its_configuration():
    server = LoopbackStore()  # kept: its listening socket closes with it
    store = server.store
    job = job_identity(TrainConfig(replicas=3, run_dir="a", threads=1), "c0ffee" * 4, 2)
    check_same_job(store, job, 0)
    check_same_job(store, job_identity(TrainConfig(replicas=3, run_dir="b", threads=2), "c0ffee" * 4, 2), 1)
    other = job_identity(TrainConfig(replicas=3, seq_len=32, lr=1e-3), "deadbeef" * 4, 2)
    with pytest.raises(AdmissionError) as e:
        check_same_job(store, other, 2)
    assert str(e.value) == ("group 2 does not match the job it joins: corpus 'deadbeefdead' here, 'c0ffeec0ffee' in "
                            "the job (--data); lr 0.001 here, 0.003 in the job (--lr); seq_len 32 here, 64 in the "
                            "job (--seq-len)")


def test_a_group_index_is_held_by_one_live_process():
    server = LoopbackStore()
    server.store.set(READY_KEY, "1")
    first = GroupLease(server.address, 1, "host-a pid 1", wait_s=10)
    first.acquire("10.0.0.1:4000")
    with pytest.raises(AdmissionError, match=r"group 1 is already running \(host-a pid 1 .*--group 1"):
        GroupLease(server.address, 1, "host-b pid 2", wait_s=10).acquire("10.0.0.2:4000")
    first.release()  # as if it died: its beat stops
    successor = GroupLease(server.address, 1, "host-c pid 3", wait_s=10)
    successor.acquire("10.0.0.3:4000")
    assert server.store.get("group/1/owner").decode() == successor.owner
    assert server.store.get("group/1/address").decode() == "10.0.0.3:4000"
    successor.release()


def test_group_and_lighthouse_commands_refuse_bad_input_in_one_line(monkeypatch, capsys):
    for name in ("RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    cases = [
        (main, ["--lighthouse", "127.0.0.1:1", "--group", "0", "--groups", "2"], "neither RANK (torchrun) nor "),
        (main, ["--lighthouse", "127.0.0.1:1", "--group", "2", "--groups", "2"], "argument --group: must be in [0, "),
        (main, ["--lighthouse", "127.0.0.1:1", "--group", "0", "--groups", "2", "--replicas", "4"],
         "argument --replicas: a group job has --groups replicas"),
        (main, ["--lighthouse", "127.0.0.1:1", "--group", "0", "--groups", "2", "--steps", "0"],
         "argument --steps: must be >= 1, got 0"),
        (main, ["--lighthouse", "127.0.0.1:1", "--group", "0", "--groups", "2", "--policy", "restart"],
         "argument --policy: restart (checkpoint-restart of the whole job) needs the single-host launcher"),
        (main, ["--lighthouse", "127.0.0.1:1", "--group", "0", "--groups", "2", "--inject", "hang@3:1=5"],
         "--inject 'hang@3:1=5': hang needs the single-host launcher"),
        (main, ["--lighthouse", "127.0.0.1:1", "--group", "0", "--groups", "2", "--inject", "kill@3:2"],
         "--inject 'kill@3:2': replica 2 is not in [0, 2)"),
        (lighthouse_main, ["--bind", "nowhere"], "--bind must be HOST:PORT, got 'nowhere'"),
        (lighthouse_main, ["--min-replicas", "0"], "argument --min-replicas: must be >= 1, got 0"),
    ]
    for entry, argv, message in cases:
        with pytest.raises(SystemExit) as e:
            entry(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert job_store_address("http://10.1.2.3:29510") == "10.1.2.3:29511"
