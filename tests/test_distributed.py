"""Training and evaluation with several processes: torchrun + DistributedDataParallel (gloo).

The torchrun launches run two CPU processes (`python -m torch.distributed.run --standalone
--nproc_per_node 2`, which picks a free port itself) on the tiny synthetic cache. A run with
two processes is not bit-identical to one process on the same batches: the gradient is the
average of two half-batch gradients (another float32 summation order than one batch), and
Adam's first steps are about lr * sign(g), so a coordinate whose gradient is at rounding level
can move by up to lr differently. Hence: gradients of one step are compared at relative error
1e-3 (measured 1e-6 to 5e-5), logged losses at 1e-4, weights after two steps at 2 x steps x lr
per coordinate. With --random_pad > 0 the runs differ more: each rank draws its own pads.
"""
import json
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler

from training import harness
from config import parse_config
import reproduce
from ECG_Dataset import ClassBalancedSampler, get_dataloaders
import ddp_worker
from evaluate import shard_loader
from helpers import PAPER_TRAINING, REPO, weights
from plumbing import distributed
from plumbing.flags import ConfigError

LR = 1e-3
RUN_FLAGS = ["--max_length", "3072", "--random_pad", "0", "--batch_size", "8",
             "--eval_batch_size", "18", "--epochs", "1", "--device", "cpu"]


def torchrun(*args, timeout: int = 240) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               *map(str, args)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def flat(state: dict) -> torch.Tensor:
    return torch.cat([value.flatten().float() for value in state.values()])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --- the data each rank sees -------------------------------------------------------------

@pytest.mark.parametrize("world", [2, 4])
def test_each_step_the_ranks_batches_make_up_the_single_process_batch(world):
    labels = np.repeat(np.arange(9), [7, 3, 5, 2, 9, 4, 6, 3, 8])
    batch = 8

    def batches(replicas, rank, start=0):
        sampler = ClassBalancedSampler(labels, seed=2, num_replicas=replicas, rank=rank)
        sampler.set_epoch(3, start)
        return list(BatchSampler(sampler, batch // replicas, drop_last=False))

    single = batches(1, 0)
    shards = [batches(world, rank) for rank in range(world)]
    assert all(len(shard) == len(single) for shard in shards)  # the same number of steps
    for step, expected in enumerate(single[:-1]):
        assert sorted(i for shard in shards for i in shard[step]) == sorted(expected), step
    last = [i for shard in shards for i in shard[-1]]  # the last step: plus wrap-around padding
    assert set(single[-1]) <= set(last) and len(last) - len(single[-1]) < world
    # Class balance: over the full steps the ranks together see each class equally often.
    seen = np.bincount(labels[[i for shard in shards for b in shard[:-1] for i in b]], minlength=9)
    assert seen.max() - seen.min() <= 1
    # Resuming at step k (the harness passes start = k x per-rank batch) continues each rank.
    for rank in range(world):
        assert batches(world, rank, start=4 * (batch // world)) == shards[rank][4:]


@pytest.mark.parametrize("bucket", [False, True])
@pytest.mark.parametrize("world,max_batches", [(2, 0), (3, 0), (2, 2)])
def test_shard_loaders_partition_the_records_one_process_evaluates(tiny_cache, bucket, world, max_batches):
    loader = get_dataloaders(str(tiny_cache), 4, 5, 2048, 1024, splits=("test",), bucket=bucket)["test"]
    expected = [i for b in list(loader.batch_sampler)[:max_batches or None] for i in b]
    shares = [[i for b in shard_loader(loader, rank, world, max_batches).batch_sampler for i in b]
              for rank in range(world)]
    assert sorted(i for share in shares for i in share) == sorted(expected)
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert all(len(shard_loader(loader, r, world, max_batches)) <= (max_batches or len(loader))
               for r in range(world))


def test_union_sum_and_helpers_are_the_identity_in_one_process():
    t = torch.tensor([1.0, 2.0], requires_grad=True)
    assert distributed.union_sum(t) is t and distributed.all_reduce(t) is t
    model = torch.nn.Linear(2, 2)
    assert distributed.unwrap(model) is model and distributed.distributed_model(model, torch.device("cpu")) is model
    assert distributed.average_logged({"loss": torch.tensor(2.5)}, True) == ({"loss": 2.5}, True)
    assert distributed.gather_to_main({"a": 1}) == [{"a": 1}] and distributed.on_main_process(lambda: 7) == 7


def test_batch_size_must_split_evenly_over_the_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="--batch_size 64 must be a multiple of the number "
                                         r"of processes \(3\)"):
        parse_config("CE", {}, argv=[], training=PAPER_TRAINING)
    assert parse_config("CE", {}, argv=["--batch_size", "63"], training=PAPER_TRAINING).batch_size == 63


def test_reproduce_launches_each_run_with_torchrun_when_asked():
    job = reproduce.plan_jobs("smoke", ["CE"], "result/x")[0]
    torchrun_prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert reproduce.job_command(job, "train", 2)[:6] == [*torchrun_prefix, str(job.script)]
    assert reproduce.job_command(job, "evaluate", 2)[5].endswith("evaluate.py")
    assert reproduce.job_command(job, "resume")[:2] == [sys.executable, str(job.script)]
    assert reproduce.parse_args(["--nproc-per-node", "4"]).nproc_per_node == 4
    with pytest.raises(reproduce.ReproduceError, match="--nproc_per_node must be at least 1"):
        reproduce.parse_args(["--nproc-per-node", "0"])


# --- one step: gradients -------------------------------------------------------------------

@pytest.fixture(scope="module")
def ddp_gradients(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_grads")
    result = torchrun(REPO / "tests" / "ddp_worker.py", "grads", out)
    assert result.returncode == 0, result.stderr[-3000:]
    return {case: [torch.load(out / f"{case}_rank{r}.pt", weights_only=True) for r in (0, 1)]
            for case in ddp_worker.CASES}


def single_process_step(case: str, shards: int = 1) -> tuple[torch.Tensor, float]:
    """The gradient and loss of one process on the union batch; with shards=2, the mean of the
    two halves' gradients (what DDP would give if the losses ignored the other rank)."""
    module, cfg = ddp_worker.case_config(case)
    model = ddp_worker.fresh_model()
    x, mask = ddp_worker.union_batch()
    y = ddp_worker.labels_for(model, x, mask, ddp_worker.CASES[case][1])
    total = 0.0
    for part in np.array_split(np.arange(len(y)), shards):
        if case in ddp_worker.SEEDED:
            torch.manual_seed(ddp_worker.SEEDED[case])
        loss, _ = module.loss_fn(model, x[part], y[part], mask[part], 0, cfg)
        (loss / shards).backward()
        total += float(loss.detach()) / shards
    return torch.cat([p.grad.flatten() for p in model.parameters()]), total


@pytest.mark.slow
@pytest.mark.parametrize("case", ["CE", "NSR_mixed", "NSR_one_rank", "jacob"])
def test_ddp_gradient_is_the_single_process_gradient_on_the_union_batch(ddp_gradients, case):
    ranks = ddp_gradients[case]
    grads = [flat(r["grads"]) for r in ranks]
    assert torch.equal(grads[0], grads[1])  # DDP's all-reduce: both ranks step alike
    expected, loss = single_process_step(case)
    assert relative_error(grads[0], expected) < 1e-3
    assert ranks[0]["logged"]["loss"] == pytest.approx(loss, rel=1e-5)
    if case in ("NSR_mixed", "jacob"):  # the check can fail: per-rank normalizers are far off
        naive, _ = single_process_step(case, shards=2)
        assert relative_error(naive, expected) > 1e-2


@pytest.mark.slow
def test_adversarial_training_step_runs_and_synchronises(ddp_gradients):
    """PGD runs on the plain module inside the step; its random starts are drawn per rank,
    so only the clean term matches one process exactly."""
    ranks = ddp_gradients["advls"]
    grads = [flat(r["grads"]) for r in ranks]
    assert torch.equal(grads[0], grads[1]) and torch.isfinite(grads[0]).all()
    expected, _ = single_process_step("advls")
    assert relative_error(grads[0], expected) < 0.2
    assert ranks[0]["logged"]["loss_ce"] == pytest.approx(ddp_gradients["CE"][0]["logged"]["loss"], rel=1e-6)
    assert ranks[0]["logged"]["loss_adv"] > 0


@pytest.mark.slow
def test_wongs_fast_adversarial_step_averages_the_ranks_gradients(ddp_gradients):
    """--wong_loss 1: the FGSM step runs on the plain module, the trained-on pass through DDP's
    wrapper, so the ranks' gradients are averaged: with the random starts seeded alike, the mean
    of one process's gradients on the two shares (its loss is a per-rank mean)."""
    ranks = ddp_gradients["fast_adv_wong"]
    grads = [flat(r["grads"]) for r in ranks]
    assert torch.equal(grads[0], grads[1]) and torch.isfinite(grads[0]).all()
    expected, loss = single_process_step("fast_adv_wong", shards=2)
    assert relative_error(grads[0], expected) < 1e-4
    assert ranks[0]["logged"]["loss_adv"] == pytest.approx(loss, rel=1e-5) and ranks[0]["logged"]["eps_t"] > 0
    clean, _ = single_process_step("CE")  # the FGSM inputs did change the gradient
    assert relative_error(expected, clean) > 1e-3


# --- the method scripts under torchrun ---------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("method,run,extra", [
    ("CE", "CE", ["--sweeps", "white", "--sweep_max_batches", "1"]),
    ("NSR", "NSR_beta1_1_beta2_1", ["--preset", "smoke", "--sweeps", ""]),
])
def test_script_under_torchrun_matches_one_process_and_writes_each_file_once(
        tiny_cache, tmp_path, method, run, extra):
    module = reproduce.SCRIPTS[method]
    flags = ["--data_dir", str(tiny_cache), "--max_batches", "2", *RUN_FLAGS, *extra]
    result = torchrun(module.__file__, *flags, "--result_dir", tmp_path / "ddp")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("epoch 0: loss") == 1  # rank 0 alone prints
    assert result.stdout.count("clean metrics on the test split") == 1
    ddp = tmp_path / "ddp" / run
    config = json.loads((ddp / "config.json").read_text())
    assert config["world_size"] == 2 and config["batch_size"] == 8
    assert not list(ddp.rglob(".*.tmp"))
    final = weights(ddp / "model.pt")
    for checkpoint in ("last.pt", "epoch_001.pt"):
        assert all(torch.equal(final[k], v) for k, v in weights(ddp / "checkpoints" / checkpoint).items())
    saved = torch.load(ddp / "checkpoints" / "last.pt", weights_only=True)
    assert len(saved["rng_per_rank"]) == 2 and (saved["epoch"], saved["batch"]) == (1, 0)
    assert json.loads((ddp / "eval_test.json").read_text())["clean"]["n"] == 18  # shares summed

    status = harness.main(module, argv=[*flags, "--result_dir", str(tmp_path / "single")])
    assert status == 0
    single = tmp_path / "single" / run
    history, expected = (json.loads((d / "history.json").read_text())[0] for d in (ddp, single))
    assert history.keys() == expected.keys()
    # Adam's first step moves every weight by about lr whatever its gradient's size, so a gradient
    # within rounding of zero can move a weight either way in the two runs (by 2 lr at most, the
    # bound below): the second batch's loss, and so the epoch's mean, agree only to that.
    for key in expected:
        if key.startswith("loss"):
            assert history[key] == pytest.approx(expected[key], rel=5e-3), key
    assert (flat(final) - flat(weights(single / "model.pt"))).abs().max() <= 2 * 2 * LR
    if "white" in extra:
        sweep = json.loads((ddp / "robustness_test.json").read_text())["sweeps"]["white"]
        assert sweep["n"] == 18 and sweep["settings"]["max_batches"] == 1


@pytest.mark.slow
def test_a_signal_on_one_rank_stops_every_rank_at_the_same_batch_and_resume_matches(tiny_cache, tmp_path):
    worker = REPO / "tests" / "ddp_worker.py"
    # Random pads this time: resuming must restore each rank's own random stream.
    flags = ["--", "--data_dir", tiny_cache, "--max_batches", "3", "--sweeps", "", *RUN_FLAGS,
             "--max_length", "2048", "--random_pad", "1024"]
    straight = torchrun(worker, "train", tmp_path / "straight", "CE", *flags,
                        "--result_dir", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    reference = [torch.load(tmp_path / "straight" / f"weights_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert torch.equal(flat(reference[0]), flat(reference[1]))  # the ranks end with the same weights

    (tmp_path / "stopped").mkdir()
    stopped = torchrun(worker, "train", tmp_path / "stopped", "CE", "--stop_on_rank", "1",
                       "--stop_at_call", "2", *flags, "--result_dir", tmp_path / "stopped")
    assert stopped.returncode != 0  # torchrun reports the workers' status 128 + SIGTERM
    assert f"exitcode  : {128 + signal.SIGTERM}" in stopped.stderr
    assert stopped.stderr.count("stopped by signal 15: saved epoch 0, batch 2") == 1
    run = tmp_path / "stopped" / "CE"
    saved = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["batch"]) == (0, 2) and not (run / "model.pt").exists()
    assert not torch.equal(saved["rng_per_rank"][0]["torch"], saved["rng_per_rank"][1]["torch"])

    resumed = torchrun(worker, "train", tmp_path / "stopped", "CE", *flags,
                       "--result_dir", tmp_path / "stopped", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("resuming") == 1
    for r in (0, 1):
        got = torch.load(tmp_path / "stopped" / f"weights_rank{r}.pt", weights_only=True)
        assert torch.equal(flat(got), flat(reference[0])), r  # bit for bit on the CPU
    assert torch.equal(flat(weights(run / "model.pt")), flat(reference[0]))


@pytest.mark.slow
def test_reproduce_under_torchrun_runs_the_chain_once_with_that_many_processes(tmp_path):
    """`torchrun --nproc_per_node 2 reproduce.py` = `reproduce.py --nproc-per-node 2`: one chain."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(REPO / "reproduce.py"), "--preset", "paper", "--dry-run",
                           "--result-dir", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    commands = [line for line in done.stdout.splitlines() if line.startswith("$ ")]
    training = [c for c in commands if "CPSC2018_CNN_" in c]
    assert len(training) == 7  # printed by one process only
    assert all("torch.distributed.run" in c and "--nproc_per_node=2" in c for c in training)
