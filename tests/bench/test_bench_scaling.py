"""bench/bench_scaling.py: every planned launch resolves, through the trainer's own configuration code on a
simulated 4-GPU node, to its layout and the batch it claims; the exactness suite really runs on 2 gloo processes
and reproduces the 1-process losses."""
import json
import sys

import pytest
import yaml

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "bench"))
import bench_scaling as bs  # noqa: E402

from megatron.neox_arguments import Environment, NeoXArgs  # noqa: E402


def _resolve(cfg, tmp_path, name):
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    env = Environment(cuda_device_count=4, environ={"WORLD_SIZE": str(cfg["num_gpus"]), "RANK": "0",
                                                    "LOCAL_RANK": "0"})
    return NeoXArgs.from_ymls([str(path)], env=env)


def test_every_gpu_launch_resolves_to_its_layout_and_batch(tmp_path, pythia_tokenizer_path):
    runs = bs.plan_runs(list(bs.SUITES), "gpu", 4)
    data = bs.corpus(str(tmp_path), "gpu", None, 1 << 16, str(pythia_tokenizer_path))
    names = [r.name for r in runs]
    assert len(set(names)) == len(names)
    for run in runs:
        args = _resolve(bs.run_config(run, "gpu", data), tmp_path, run.name)
        lay = run.layout
        assert (args.data_parallel_size, args.model_parallel_size, args.pipe_parallel_size) == (lay.dp, lay.tp, lay.pp)
        assert args.train_batch_size == run.global_batch == args.train_micro_batch_size_per_gpu * \
            args.gradient_accumulation_steps * lay.dp
        assert args.seq_length == run.seq_length and args.precision == "bfloat16" and args.torch_compile
        assert args.attention_variant == ("sep_kernel" if run.mode == "sepllm_n64" else "full"), run.name
    by_suite = {s: [r for r in runs if r.suite == s] for s in bs.SUITES}
    # weak scaling: the same micro-batch per GPU at every DP size
    assert {(r.micro_batch, r.grad_accum) for r in by_suite["dp"]} == {(8, 1)}
    assert sorted(r.layout.dp for r in by_suite["dp"]) == [1, 1, 2, 2, 4, 4]
    # TP = N against DP = N on the same GPUs, at one global batch per N
    for n in (2, 4):
        pair = [r for r in by_suite["tp"] if r.layout.world == n]
        assert {r.layout for r in pair} == {bs.Layout(dp=n), bs.Layout(dp=1, tp=n)}
        assert len({r.global_batch for r in pair}) == 1
    # the pipeline pair does the same micro-batches per data-parallel rank
    pp = by_suite["pp"]
    assert {r.layout for r in pp} == {bs.Layout(dp=2, pp=1), bs.Layout(dp=2, pp=2)}
    assert len({(r.micro_batch, r.grad_accum) for r in pp}) == 1
    # exactness: one global batch, and a reference with DP = TP = 1 and the same PP for every layout
    ex = by_suite["exact"]
    assert {r.global_batch for r in ex} == {8}
    for r in ex:
        assert any(o.layout == bs.Layout(dp=1, pp=r.layout.pp) for o in ex), r.name
    assert [r.shape for r in by_suite["largest"]] == ["6.9b", "2.8b", "1.4b"]
    assert all(r.checkpoint_activations and r.seq_length == 8192 for r in by_suite["largest"])


def test_layouts_beyond_the_gpus_are_skipped_and_bad_options_refused(tmp_path, capsys):
    runs = bs.plan_runs(["dp"], "gpu", 2)
    assert max(r.layout.world for r in runs[:4]) <= 2 and all(r.layout.world <= 2 for r in runs)
    with pytest.raises(SystemExit, match="--suite"):
        bs.main(["--gpus", "2", "--suite", "dp,bogus", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--vocab-file"):
        bs.main(["--gpus", "2", "--suite", "dp", "--out", str(tmp_path), "--vocab-file", str(tmp_path / "no.json")])
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.json").write_text('{"runs": {}}')  # not this bench's: never resumed into or overwritten
    with pytest.raises(SystemExit, match="--out .*results.json is not this bench's"):
        bs.main(["--preset", "cpu", "--gpus", "2", "--suite", "exact", "--out", str(other)])
    assert (other / "results.json").read_text() == '{"runs": {}}' and not (other / "corpus").exists()


@pytest.mark.slow
@pytest.mark.deepspeed
def test_exact_suite_on_two_processes_reproduces_one_process(tmp_path, capsys):
    out = tmp_path / "scaling"
    assert bs.main(["--preset", "cpu", "--gpus", "2", "--suite", "exact", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    runs = {r["layout"]: r for r in results["runs"].values()}
    assert set(runs) == {"dp1.tp1.pp1", "dp2.tp1.pp1", "dp1.tp2.pp1"}
    assert all(r["status"] == "done" and len(r["losses"]) == 20 for r in runs.values())
    ref = {int(k): v for k, v in runs["dp1.tp1.pp1"]["losses"].items()}
    for layout in ("dp2.tp1.pp1", "dp1.tp2.pp1"):
        got = {int(k): v for k, v in runs[layout]["losses"].items()}
        assert bs.max_rel_diff(got, ref) < 1e-5, layout
    table = (out / "table.md").read_text()
    assert "| dp2.tp1.pp1 | dp1.tp1.pp1 | 20 |" in table
    # a rerun keeps the finished runs: nothing is launched again
    before = {k: r["seconds"] for k, r in results["runs"].items()}
    assert bs.main(["--preset", "cpu", "--gpus", "2", "--suite", "exact", "--out", str(out)]) == 0
    again = json.loads((out / "results.json").read_text())["runs"]
    assert {k: r["seconds"] for k, r in again.items()} == before
