"""The neighbour path: base-refresh rule, and the MeCeFO path behind mecefo_kernels' public API."""

import pytest

import mecefo_kernels
from mecefo.neighbor import ExactPath, MeCeFOPath, needs_refresh, neighbor_path

HAS_MECEFO_API = hasattr(mecefo_kernels, "apply_mecefo")


def test_refresh_when_becoming_a_neighbour_and_every_tau_steps():
    tau = 10
    assert needs_refresh(13, tau, was_neighbour=False, bases_step=None)  # episode starts
    assert needs_refresh(13, tau, was_neighbour=False, bases_step=3)  # a new episode: fresh bases
    assert not needs_refresh(14, tau, was_neighbour=True, bases_step=13)
    assert needs_refresh(20, tau, was_neighbour=True, bases_step=13)  # multiple of tau
    assert not needs_refresh(20, tau, was_neighbour=True, bases_step=20)  # step 20 replayed
    assert not needs_refresh(13, tau, was_neighbour=False, bases_step=13)  # first step replayed
    assert needs_refresh(14, tau, was_neighbour=True, bases_step=None)  # healed mid-episode


def test_exact_path_changes_nothing():
    path = neighbor_path("ndb-exact", rank=None, tau=10)
    assert isinstance(path, ExactPath)
    assert neighbor_path("shrink", rank=None, tau=10).skipped_parameters(None) == []


@pytest.mark.skipif(HAS_MECEFO_API, reason="mecefo_kernels provides the neighbour API")
def test_mecefo_path_says_what_is_missing():
    with pytest.raises(RuntimeError, match="policy mecefo needs mecefo_kernels.apply_mecefo"):
        MeCeFOPath(rank=None, tau=10)
