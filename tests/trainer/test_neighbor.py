"""The neighbour path: the job-wide bases refresh rule, and the MeCeFO path behind mecefo_kernels' public API."""

import pytest

import mecefo_kernels
from mecefo.neighbor import ExactPath, MeCeFOPath, neighbor_path, refresh_due
from mecefo.policy import PRESETS


def due(step, needed=True, episode_open=False, bases_step=None, tau=10):
    return refresh_due(step, needed=needed, episode_open=episode_open, bases_step=bases_step, tau=tau)


def test_refresh_when_an_episode_starts_then_every_tau_steps():
    assert due(13) is True  # an episode starts, no bases yet
    assert due(13, bases_step=3) is True  # a new episode: fresh bases
    assert due(14, episode_open=True, bases_step=13) is False  # within the episode, not a multiple of tau
    assert due(20, episode_open=True, bases_step=13) is True  # a multiple of tau within the episode
    assert due(14, episode_open=True, bases_step=None) is True  # no bases (a checkpoint without them)
    assert due(13, bases_step=13) is False  # the first step replayed
    assert due(20, episode_open=True, bases_step=20) is False  # a refreshed step replayed
    assert due(20, needed=False) is False and due(13, needed=False, bases_step=None) is False  # nobody approximates


def test_exact_policies_take_the_exact_path():
    for name in ("ndb-exact", "spread", "shrink", "restart"):
        assert isinstance(neighbor_path(PRESETS[name], rank=None, tau=10), ExactPath), name
    for name in ("mecefo", "spread-orphan", "neighbour-orphan", "auto"):
        assert isinstance(neighbor_path(PRESETS[name], rank=None, tau=10), MeCeFOPath), name
    assert neighbor_path(PRESETS["shrink"], rank=None, tau=10).skipped_parameters(None) == []


def test_mecefo_path_says_what_is_missing(monkeypatch):
    monkeypatch.delattr(mecefo_kernels, "refresh_bases")
    with pytest.raises(RuntimeError, match="approximating policies .* need mecefo_kernels.refresh_bases"):
        MeCeFOPath(rank=None, tau=10)


def test_exact_path_never_refreshes_nor_approximates():
    path = ExactPath()
    assert path.refresh(None) is False and path.bases_state(None) == {}
    with pytest.raises(RuntimeError, match="never approximates"):
        with path.context(None, neighbour=True):
            pass


def test_bad_basis_is_named():
    with pytest.raises(ValueError, match="basis must be one of weight, momentum"):
        MeCeFOPath(rank=None, tau=10, basis="gradient")
