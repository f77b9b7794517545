"""The commit ledger's two rules on a real TCPStore (the end-to-end split brain is in test_run_ends.py)."""

import pytest

from mecefo.fencing import ROOT_LINEAGE, CommitLedger, Fenced, next_lineage
from mecefo.quorum import LoopbackStore, connect_store


@pytest.fixture
def store():
    server = LoopbackStore()
    return server, connect_store(server.address, 10)


def test_one_quorum_owns_a_step(store):
    server, client = store
    mine, theirs = CommitLedger(server.store, 0), CommitLedger(client, 0)
    mine.check_behind(7, quorum=3)  # nobody committed step 7 yet
    mine.claim(7, quorum=3)
    theirs.claim(7, quorum=3)  # every member of quorum 3 claims the same step
    assert theirs.owner(7) == "3" and theirs.owner(8) is None
    with pytest.raises(Fenced, match="step 7 was committed by quorum 3, not this replica's quorum 5"):
        theirs.claim(7, quorum=5)
    with pytest.raises(Fenced, match="the job already committed step 7 .quorum 3. and this replica's quorum 5 "
                                     "could not heal it"):
        theirs.check_behind(7, quorum=5)


def test_generations_have_their_own_steps(store):
    """A job restart replays the steps after its checkpoint under the next generation."""
    server, client = store
    CommitLedger(client, 0).claim(4, quorum=1)
    replay = CommitLedger(client, 1)
    replay.check_behind(4, quorum=9)
    replay.claim(4, quorum=9)


def test_lineage_is_a_chain_of_commits():
    a = next_lineage(ROOT_LINEAGE, 0, 0, 1)
    assert a == next_lineage(ROOT_LINEAGE, 0, 0, 1) and len(a) == 16
    assert len({a, next_lineage(ROOT_LINEAGE, 0, 0, 2), next_lineage(ROOT_LINEAGE, 0, 1, 1),
                next_lineage(a, 1, 0, 1)}) == 4
