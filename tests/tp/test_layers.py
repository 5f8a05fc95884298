"""The tensor-parallel building blocks on 2 gloo ranks against their unsplit twins, on random inputs: the region
collectives, column/row-parallel linears (gather_output, input_is_parallel, parallel_output), the vocab-parallel
embedding and cross entropy, the model-parallel random stream, the gradient norm, and the partition rule."""
import pytest
import torch
import torch.nn.functional as F

import tp_harness as h

pytestmark = pytest.mark.deepspeed


def _full(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _collectives(rank, world):
    from megatron import mpu

    h.init_grid(world)
    x = torch.full((2, 4), float(rank + 1), dtype=torch.float64, requires_grad=True)
    mpu.copy_to_model_parallel_region(x).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, world))  # backward: summed over ranks
    y = x.detach().clone().requires_grad_(True)
    out = mpu.reduce_from_model_parallel_region(y * 1.0)
    assert torch.equal(out, torch.full_like(out, sum(range(1, world + 1))))
    out.sum().backward()
    assert torch.equal(y.grad, torch.ones_like(y))  # backward: identity
    z = torch.arange(8.0, dtype=torch.float64).view(1, 8).requires_grad_(True)
    part = mpu.scatter_to_model_parallel_region(z)
    assert torch.equal(part, z.detach()[:, rank * 4:(rank + 1) * 4])
    gathered = mpu.gather_from_model_parallel_region(part * (rank + 1))
    assert gathered.shape == (1, 8)
    gathered.sum().backward()
    # Gather's backward keeps this rank's slice of its output gradient (rank + 1 here); scatter's backward then
    # gathers the slices of every rank.
    want = torch.tensor([[1.0] * 4 + [2.0] * 4], dtype=torch.float64)
    assert torch.equal(z.grad, want)


def test_region_collectives():
    h.run_ranks(_collectives, 2)


def _linears(rank, world):
    from megatron import mpu
    from megatron.mpu import partition

    h.init_grid(world)
    args = h.make_args(world, world, USE_ORIGINAL_FULL_ATTEN=True)
    gen = torch.Generator().manual_seed(0)
    x, w, b, g = _full(gen, 3, 5, 8), _full(gen, 6, 8), _full(gen, 6), _full(gen, 3, 5, 6)
    want = F.linear(x, w, b)

    def column(**kw):
        layer = mpu.ColumnParallelLinear(args, 8, 6, init_method=torch.nn.init.zeros_, **kw).double()
        with torch.no_grad():
            layer.weight.copy_(partition.shard(w, 0, layer.segments, world, rank))
            layer.bias.copy_(partition.shard(b, 0, layer.segments, world, rank))
        return layer

    layer = column(gather_output=True)
    xi = x.clone().requires_grad_(True)
    out, _ = layer(xi)
    assert h.rel_err(out, want) < 1e-12
    (out * g).sum().backward()
    xr = x.clone().requires_grad_(True)
    (F.linear(xr, w, b) * g).sum().backward()
    assert h.rel_err(xi.grad, xr.grad) < 1e-12
    assert h.rel_err(layer.weight.grad, partition.shard(g.reshape(-1, 6).T @ x.reshape(-1, 8), 0, (6,), world,
                                                        rank)) < 1e-12
    local, _ = column(gather_output=False)(x)
    assert h.rel_err(local, want[..., rank * 3:(rank + 1) * 3]) < 1e-12
    with pytest.raises(ValueError, match="gather_output with 2 segments"):
        mpu.ColumnParallelLinear(args, 8, 8, gather_output=True, partition_sizes=(4, 4))

    w2 = _full(gen, 4, 6)
    b2 = _full(gen, 4)
    want2 = F.linear(want, w2, b2)
    for input_is_parallel in (False, True):
        row = mpu.RowParallelLinear(args, 6, 4, input_is_parallel=input_is_parallel,
                                    init_method=torch.nn.init.zeros_).double()
        with torch.no_grad():
            row.weight.copy_(partition.shard(w2, 1, (6,), world, rank))
            row.bias.copy_(b2)
        inp = want[..., rank * 3:(rank + 1) * 3] if input_is_parallel else want
        out, bias = row(inp)
        assert bias is None and h.rel_err(out, want2) < 1e-12
    row = mpu.RowParallelLinear(args, 6, 4, input_is_parallel=True, parallel_output=True,
                                init_method=torch.nn.init.zeros_).double()
    with torch.no_grad():
        row.weight.copy_(partition.shard(w2, 1, (6,), world, rank))
        row.bias.copy_(b2)
    partial, bias = row(want[..., rank * 3:(rank + 1) * 3])
    summed = mpu.reduce_from_model_parallel_region(partial.detach().clone()) + bias
    assert h.rel_err(summed, want2) < 1e-12


def test_column_and_row_parallel_linears():
    h.run_ranks(_linears, 2)


def _vocab(rank, world):
    from megatron import mpu
    from megatron.mpu import partition

    h.init_grid(world)
    args = h.make_args(world, world, USE_ORIGINAL_FULL_ATTEN=True)
    gen = torch.Generator().manual_seed(1)
    vocab = 16
    table = _full(gen, vocab, 4)
    ids = torch.randint(0, vocab, (3, 7), generator=gen)
    emb = mpu.VocabParallelEmbedding(args, vocab, 4, init_method=torch.nn.init.zeros_).double()
    with torch.no_grad():
        emb.weight.copy_(partition.shard(table, 0, (vocab,), world, rank))
    g = _full(gen, 3, 7, 4)
    out = emb(ids)
    assert h.rel_err(out, F.embedding(ids, table)) < 1e-12
    (out * g).sum().backward()
    ref = table.clone().requires_grad_(True)
    (F.embedding(ids, ref) * g).sum().backward()
    assert h.rel_err(emb.weight.grad, partition.shard(ref.grad, 0, (vocab,), world, rank)) < 1e-12

    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        logits = (_full(gen, 40, vocab) * 4).to(dtype)
        target = torch.randint(0, vocab, (40,), generator=gen)
        weight = _full(gen, 40).to(dtype)
        mine = logits[:, rank * 8:(rank + 1) * 8].clone().requires_grad_(True)
        loss = mpu.vocab_parallel_cross_entropy(mine, target)
        (loss * weight).sum().backward()
        ref = logits.clone().requires_grad_(True)
        ref_loss = F.cross_entropy(ref, target, reduction="none")
        (ref_loss * weight).sum().backward()
        assert h.rel_err(loss, ref_loss) < tol
        assert h.rel_err(mine.grad, ref.grad[:, rank * 8:(rank + 1) * 8]) < tol


def test_vocab_parallel_embedding_and_cross_entropy():
    h.run_ranks(_vocab, 2)


def _random_streams(rank, world, out_dir):
    from megatron import mpu

    h.init_grid(world)
    torch.manual_seed(11)  # every rank of the group seeds the default stream alike
    mpu.model_parallel_seed(11, mpu.get_model_parallel_rank(), world, "cpu")
    ones = torch.ones(1000)
    outside = F.dropout(ones, 0.5)
    with mpu.get_rng_tracker().fork():
        inside = F.dropout(ones, 0.5)
    after = F.dropout(ones, 0.5)
    torch.save({"outside": outside, "inside": inside, "after": after}, f"{out_dir}/rank{rank}.pt")


def test_dropout_streams(tmp_path):
    """Inside the tensor-parallel region the masks differ across ranks, outside they are equal, and a fork leaves
    the default stream where it was; at one rank the tracker is unseeded and fork changes nothing."""
    h.run_ranks(_random_streams, 2, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert torch.equal(r0["outside"], r1["outside"]) and torch.equal(r0["after"], r1["after"])
    assert not torch.equal(r0["inside"], r1["inside"])
    torch.manual_seed(11)
    ones = torch.ones(1000)
    first, second = F.dropout(ones, 0.5), F.dropout(ones, 0.5)
    assert torch.equal(first, r0["outside"]) and torch.equal(second, r0["after"])

    from megatron import mpu

    mpu.model_parallel_seed(11, 0, 1, "cpu")
    assert not mpu.get_rng_tracker().active
    torch.manual_seed(11)
    with mpu.get_rng_tracker().fork():
        a = F.dropout(ones, 0.5)
    assert torch.equal(a, first)


def _grad_norm(rank, world, drop_flags):
    from deepspeed.runtime.utils import clip_grad_norm_

    from megatron import mpu
    from megatron.model import build_sequential_model

    keys = {"USE_ORIGINAL_FULL_ATTEN": True, "use_bias_in_attn_linear": True}
    torch.manual_seed(3)
    ref = build_sequential_model(h.make_args(1, world, **keys))
    ids = h.tokens(2, 25, 128, seed=2)
    pos = torch.arange(24).expand(2, -1)
    from megatron.model.loss import lm_loss

    lm_loss(ref((ids[:, :-1], pos)), ids[:, 1:], torch.ones(2, 24)).backward()
    want = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters() if p.grad is not None]))
    grid_topo = h.init_grid(world)
    torch.manual_seed(3)
    model = build_sequential_model(h.make_args(world, world, **keys), parallel_output=True)
    if drop_flags:
        for p in model.parameters():
            p.model_parallel = False
    lm_loss(model((ids[:, :-1], pos)), ids[:, 1:], torch.ones(2, 24)).backward()
    norm = clip_grad_norm_(list(model.parameters()), max_norm=1e9, mpu=mpu.ClipGroups(mpu.get_grid()))
    assert (abs(float(norm) - float(want)) / float(want) < 1e-5) != drop_flags, (float(norm), float(want))
    del grid_topo


@pytest.mark.parametrize("drop_flags", [False, True], ids=["flags", "flags_removed"])
def test_gradient_norm_counts_shards_and_replicas_once(drop_flags):
    """DeepSpeed's clipping norm of the TP=2 model equals the TP=1 norm; without ``model_parallel`` on the shards
    rank 1's shards drop out and it does not."""
    h.run_ranks(_grad_norm, 2, drop_flags)


def test_partition_round_trip_and_layout():
    from megatron.mpu import partition

    full = torch.arange(24.0).view(12, 2)
    for segments in ((12,), (6, 6), (8, 2, 2)):
        shards = [partition.shard(full, 0, segments, 2, r) for r in range(2)]
        assert torch.equal(partition.merge(shards, 0, segments), full)
    q0, k0, v0 = partition.shard(full, 0, (8, 2, 2), 2, 0).split([4, 1, 1])
    assert torch.equal(q0, full[:4]) and torch.equal(k0, full[8:9]) and torch.equal(v0, full[10:11])
    with pytest.raises(ValueError, match="segment of 3 is not divisible"):
        partition.shard(torch.zeros(3, 1), 0, (3,), 2, 0)


def _guard(rank, world):
    from megatron import mpu
    from megatron.training import NonFiniteStepGuard

    h.init_grid(world)
    for bad_rank in (None, 1):
        p = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.SGD([p], lr=0.1)
        guard = NonFiniteStepGuard(opt, group=mpu.get_grid().get_model_parallel_group())
        p.grad = torch.full((3,), float("nan") if rank == bad_rank else 1.0)
        opt.step()
        assert guard.skipped == (bad_rank is not None), (rank, bad_rank)
        assert torch.equal(p.detach(), torch.ones(3) if bad_rank is not None else torch.full((3,), 0.9))


def test_step_guard_decides_over_the_model_parallel_group():
    """A gradient that is not finite in one tensor-parallel rank's shard only skips the step on every rank."""
    h.run_ranks(_guard, 2)
