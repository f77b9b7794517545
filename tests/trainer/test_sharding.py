"""FSDP2 inside a replica group, in real gloo processes on loopback: the sharded bases against the unsharded
ones, neighbour mode under FSDP2 against unsharded neighbour mode, gradient clipping on shards, and the bytes
each rank holds against the plan (mecefo.sharding). The whole trainer under --shard fsdp is in
test_sharded_groups.py."""

import contextlib
import copy

import pytest
import torch

import mecefo_kernels as mk
from mecefo.config import TrainConfig
from mecefo.model import shard_loss
from mecefo.models import build_model
from mecefo.sharded_basis import ShardedBasis
from mecefo.sharding import FullyShardedGroup, planned_state_bytes, preset_shapes, shard_rows, state_bytes
from sharded_group import run_group
from trainer_runs import relative_difference

pytestmark = pytest.mark.slow


def projector_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||A A^T - B B^T||_2 of two orthonormal bases: 0 for the same subspace (whatever the signs and
    rotations within it), 1 when some direction of one is orthogonal to the other."""
    a, b = a.double(), b.double()
    return torch.linalg.matrix_norm(a @ a.T - b @ b.T, ord=2).item()


def matrices(dtype):
    """(name, matrix, rank): a decaying spectrum, a flat one (a fresh Gaussian weight), uneven and
    nearly empty row shards, an all-zero matrix (the fallback)."""
    gen = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(96, 40, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(40, 40, generator=gen, dtype=torch.float64))
    decaying = (u * torch.arange(1, 41, dtype=torch.float64) ** -0.5) @ v.T
    return [("decaying", decaying.to(dtype), 6), ("flat", torch.randn(88, 32, generator=gen).to(dtype), 4),
            ("uneven rows", torch.randn(37, 24, generator=gen).to(dtype), 3),
            ("3 rows", torch.randn(3, 16, generator=gen).to(dtype), 2), ("zero", torch.zeros(20, 12, dtype=dtype), 3)]


def _bases(group, dtype):
    basis = ShardedBasis(group.rank, group.world_size, None)
    out = {}
    for name, m, rank in matrices(dtype):
        start, rows = shard_rows(m.shape[0], group.world_size, group.rank)
        for method in ("randomized", "svd"):
            out[name, method] = basis(m[start:start + rows], rank, method=method, rows=m.shape[0])
    return out


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-3)])
def test_sharded_bases_are_the_unsharded_bases(dtype, tol):
    """The sharded randomized SVD (rows over 2 gloo ranks, the same sketch) spans the subspace mecefo_kernels'
    randomized basis of the whole matrix spans, to rounding; with method svd both are the exact top right
    singular vectors. Every rank gets the same basis."""
    per_rank = run_group(_init_and_call, 2, _bases, dtype)
    for name, m, rank in matrices(dtype):
        for method in ("randomized", "svd"):
            ours = per_rank[0][name, method]
            assert torch.equal(ours, per_rank[1][name, method]), f"{name} {method}: the same on every rank"
            assert ours.shape == (m.shape[1], rank) and ours.dtype == dtype
            eye = torch.eye(rank, dtype=torch.float64)
            assert (ours.double().T @ ours.double() - eye).abs().max() < 10 * torch.finfo(dtype).eps ** 0.5
            if name == "zero":
                continue  # any orthonormal basis: no direction is preferred
            reference = mk.lowrank_basis(m, rank, method=method)
            assert projector_distance(ours, reference) < tol, (name, method)


def _init_and_call(group, fn, *args):
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.PrefixStore("test", group.store), rank=group.rank,
                            world_size=group.world_size)
    return fn(group, *args)


def _fsdp(group, dtype="float64"):
    return FullyShardedGroup(group.ranks, torch.device("cpu"), dtype, 30.0)


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _neighbour_step(group, basis_source):
    """Neighbour mode on a sharded tiny LLaMA vs the same model unsharded, on the same batch: the bases
    (from the weights, or from AdamW's first moments after two updates), the gradients, one clipped update."""
    cfg = TrainConfig(run_dir="unused", model="tiny", dtype="float64")
    reference = mk.apply_mecefo(build_model(cfg), rank=6, basis=basis_source)
    holding = _fsdp(group)
    model = holding.wrap(mk.apply_mecefo(copy.deepcopy(reference), rank=6, basis=basis_source))
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=False) for m in (reference, model)]
    gen = torch.Generator().manual_seed(7)
    batches = [torch.randint(0, 256, (4, 17), generator=gen) for _ in range(3)]
    mine = slice(2 * group.rank, 2 * group.rank + 2)  # each rank half of every batch

    def step(x, neighbour):
        for m, o in zip((reference, model), optimizers):
            o.zero_grad(set_to_none=True)
        with mk.neighbor_mode(reference, neighbour):
            shard_loss(reference, x[:, :-1], x[:, 1:]).backward()
        with mk.neighbor_mode(model, neighbour):
            (shard_loss(model, x[mine, :-1], x[mine, 1:]) / group.world_size).backward()  # the group's sum: the mean

    for x in batches[:2]:  # exact steps, so the first moments exist
        step(x, neighbour=False)
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5, foreach=False)
        holding.clip_grad_norm_(model, 0.5)
        for o in optimizers:
            o.step()
    mk.refresh_bases(reference, optimizer=optimizers[0])
    mk.refresh_bases(model, optimizer=optimizers[1], basis_fn=holding.basis_function())
    ref_bases, our_bases = mk.bases_state_dict(reference), mk.bases_state_dict(model)
    distance = max(projector_distance(our_bases[k], ref_bases[k]) for k in ref_bases)
    sources = [m.mecefo_bases_from for m in model.model.layers]
    mk.load_bases_state_dict(model, ref_bases)  # the same bases: now the gradients must agree to rounding
    step(batches[2], neighbour=True)
    grads = {n: (None if p.grad is None else _full(p.grad)) for n, p in model.named_parameters()}
    expected = {n: None if p.grad is None else p.grad.clone() for n, p in reference.named_parameters()}
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 1e-3, foreach=False)  # clipping bites: norm >> 1e-3
    holding.clip_grad_norm_(model, 1e-3)
    for o in optimizers:
        o.step()
    params = {n: _full(p.detach()) for n, p in model.named_parameters()}
    return distance, sources, grads, expected, params, {n: p.detach() for n, p in reference.named_parameters()}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("basis_source", ["weight", "momentum"])
def test_neighbour_mode_under_fsdp_equals_unsharded_neighbour_mode(basis_source):
    """2 ranks, FSDP2 over gloo, the tiny LLaMA in float64: the sharded bases (of the weights, or of the sharded
    AdamW first moments) span the unsharded ones' subspaces to 1e-9; with the same bases installed, neighbour
    mode's gradients (attention skipped, FFN recomputed under FSDP2's unshard / reshard, low-rank FFN weight
    gradients) equal the unsharded model's on the same batch to 1e-12, and so does a clipped AdamW update
    whose clip uses the global norm over the shards."""
    results = run_group(_neighbour_step, 2, basis_source)
    skipped = set(mk.neighbor_skipped_parameters(mk.apply_mecefo(build_model(
        TrainConfig(run_dir="unused", model="tiny", dtype="float64")), rank=6)))
    for distance, sources, grads, expected, params, ref_params in results:
        assert distance < 1e-9
        assert all(s == (basis_source,) * 3 for s in sources)
        for name, g in expected.items():
            if name in skipped:
                assert g is None and grads[name] is None, f"{name}: no gradient in neighbour mode"
            else:
                assert _relative(grads[name], g) < 1e-12, name
        assert relative_difference(params, ref_params) < 1e-12


def _bytes_after_a_step(group, preset):
    cfg = TrainConfig(run_dir="unused", model=preset, dtype="float32")
    model = _fsdp(group, "float32").wrap(build_model(cfg))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    x = torch.randint(0, 256, (1, 9))
    shard_loss(model, x[:, :-1], x[:, 1:]).backward()
    optimizer.step()
    shapes = [tuple(p.shape) for p in model.parameters()]
    return state_bytes(model, optimizer), shapes


def test_each_rank_holds_its_share_of_parameters_and_optimizer_state():
    """The small preset over 2 ranks in fp32 after one AdamW update: each rank's measured bytes of parameters and
    optimizer state are what planned_state_bytes computes from the preset's shapes (the README's table comes
    from it), and within 5% of half the unsharded total."""
    results = run_group(_bytes_after_a_step, 2, "small")
    shapes = preset_shapes("small")
    assert results[0][1] == shapes
    whole = planned_state_bytes(shapes, 1, 4)
    assert whole["param_bytes"] == 4 * sum(torch.Size(s).numel() for s in shapes)
    for measured, _ in results:
        assert measured == planned_state_bytes(shapes, 2, 4)
        total = measured["param_bytes"] + measured["optimizer_bytes"]
        assert abs(total / ((whole["param_bytes"] + whole["optimizer_bytes"]) / 2) - 1) < 0.05


class _Batches:
    """Fixed random sequences: shard s, rows [start, stop) of a [4, 17] block per shard."""

    micro_batch = 4

    def __init__(self):
        gen = torch.Generator().manual_seed(11)
        self.data = torch.randint(0, 256, (3, 4, 17), generator=gen)

    def batch(self, step, shard, start=0, stop=None):
        rows = self.data[shard, start:stop]
        return rows[:, :-1], rows[:, 1:]


def _group_work(group, micro_batch):
    """The group's work items over its 2 ranks, some too small to split (an idle pass on the rank without a
    piece), against one process running every item whole."""
    from mecefo.membership import WorkItem
    from mecefo.neighbor import MeCeFOPath

    cfg = TrainConfig(run_dir="unused", model="tiny", dtype="float64")
    path = MeCeFOPath(rank=6, tau=10, basis="weight")
    reference = path.prepare(build_model(cfg))
    holding = _fsdp(group)
    model = holding.wrap(copy.deepcopy(reference))
    items = [WorkItem(0, 0, 1), WorkItem(1, 1, 4), WorkItem(2, 2, 3, "neighbour"), WorkItem(0, 1, 4, "neighbour")]
    loss, shards = holding.run_work(model, path, _Batches(), 0, items, "cpu", micro_batch=micro_batch)
    stats = torch.tensor([loss, shards], dtype=torch.float64)
    group.ranks.allreduce_sum(stats)
    grads = {n: (None if p.grad is None else _full(p.grad)) for n, p in model.named_parameters()}
    return stats, grads


@pytest.mark.parametrize("micro_batch", [None, 1])
def test_every_rank_runs_a_pass_per_work_item_even_without_a_piece(micro_batch):
    """Items of 1 and 3 sequences over 2 ranks (rank 1 has no piece of the first and third, so it runs idle
    passes: FSDP2's collectives must match), exact and in neighbour mode, each piece whole or in micro-batches
    of 1 sequence (--grad-accum: rank 0's 2-sequence pieces run 2 passes, rank 1 pads its 1-sequence pieces
    with an idle pass): the group's summed gradients and loss equal one process running every piece, to
    float64 rounding."""
    from mecefo.membership import WorkItem
    from mecefo.model import run_work
    from mecefo.neighbor import MeCeFOPath

    results = run_group(_group_work, 2, micro_batch)
    path = MeCeFOPath(rank=6, tau=10, basis="weight")
    reference = path.prepare(build_model(TrainConfig(run_dir="unused", model="tiny", dtype="float64")))
    items = [WorkItem(0, 0, 1), WorkItem(1, 1, 4), WorkItem(2, 2, 3, "neighbour"), WorkItem(0, 1, 4, "neighbour")]
    for item in items:  # each piece is its own micro-batch, as the ranks run them: loss of the mean per piece
        for start, stop in ((item.start, item.start + (item.sequences + 1) // 2),
                            (item.start + (item.sequences + 1) // 2, item.stop)):
            if stop > start:
                run_work(reference, path, _Batches(), 0, [WorkItem(item.shard, start, stop, item.mode)], "cpu",
                         micro_batch=micro_batch)
    expected = {n: p.grad for n, p in reference.named_parameters()}
    for stats, grads in results:
        assert stats[1].item() == sum(i.sequences for i in items) / 4, "the idle passes count nothing"
        for name, g in expected.items():
            assert (g is None) == (grads[name] is None), name
            if g is not None:
                assert _relative(grads[name], g) < 1e-12, name


def _mixed_precision_work(group):
    """--dtype bfloat16 under --shard fsdp: the group's 4 sequences over its 2 ranks, under FSDP2's policy (bf16
    compute copies of the fp32 master shards, fp32 reduce-scatter) and the trainer's bf16 autocast."""
    from mecefo.membership import WorkItem
    from mecefo.model import compute_context
    from mecefo.neighbor import MeCeFOPath

    cfg = TrainConfig(run_dir="unused", model="tiny", dtype="bfloat16")
    path = MeCeFOPath(rank=6, tau=10, basis="weight")
    holding = _fsdp(group, "bfloat16")
    model = holding.wrap(path.prepare(build_model(cfg)))
    holding.run_work(model, path, _Batches(), 0, [WorkItem(0, 0, 4)], "cpu", compute=compute_context(cfg, "cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    grads = {n: _full(p.grad) for n, p in model.named_parameters()}
    optimizer.step()
    dtypes = {(p.to_local().dtype, p.grad.to_local().dtype) for p in model.parameters()}
    dtypes |= {(v.to_local().dtype,) for s in optimizer.state.values() for k, v in s.items() if k != "step"}
    return grads, dtypes


def test_bf16_mixed_precision_composes_with_fsdp2s_policy():
    """Mixed precision (fp32 master weights and AdamW state, bf16 compute) under FSDP2: the shards, their
    gradients and AdamW state stay fp32 (the reduce-scatter runs in fp32: gloo has none in bf16), and the
    group's gradients are as close to the fp32 gradients as the unsharded bf16 run's are (FSDP2 casts every
    parameter to bf16, autocast only the matmuls' operands: embedding and norm outputs round to bf16 too, so
    not bit for bit; within 2x of the unsharded bf16 error, overall and per parameter)."""
    from mecefo.membership import WorkItem
    from mecefo.model import compute_context, run_work
    from mecefo.neighbor import MeCeFOPath

    (grads, dtypes), (grads_1, _) = run_group(_mixed_precision_work, 2)
    assert dtypes == {(torch.float32, torch.float32), (torch.float32,)}
    cfg = TrainConfig(run_dir="unused", model="tiny", dtype="bfloat16")
    path = MeCeFOPath(rank=6, tau=10, basis="weight")
    reference = {}
    for name, compute in (("bf16", compute_context(cfg, "cpu")), ("fp32", contextlib.nullcontext)):
        model = path.prepare(build_model(cfg))
        for start, stop in ((0, 2), (2, 4)):  # the ranks' pieces, each its own micro-batch
            run_work(model, path, _Batches(), 0, [WorkItem(0, start, stop)], "cpu", compute=compute)
        reference[name] = {n: p.grad for n, p in model.named_parameters()}

    def flat(d):
        return torch.cat([d[n].flatten() for n in sorted(d)])

    bf16_error = _relative(flat(reference["bf16"]), flat(reference["fp32"]))
    assert 1e-4 < bf16_error < 5e-2, "autocast computes in bf16"
    assert all(torch.equal(grads[n], grads_1[n]) for n in grads), "both ranks gather the same gradients"
    assert 1e-4 < _relative(flat(grads), flat(reference["fp32"])) < 2 * bf16_error
    for name, g in reference["fp32"].items():
        assert _relative(grads[name], g) < 2 * _relative(reference["bf16"][name], g) + 1e-6, name
