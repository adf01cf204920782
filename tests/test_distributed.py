"""Training over several processes (``dsnet.distributed``): two gloo processes against one, resume."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

import dsnet
from dsnet.data import digits
from dsnet.distributed import DistributedError, World, shard_loader, start, stop, world_from_env
from dsnet.training import ComplexityPenalty, LossWeights, evaluate_gate, train_gate, train_supernet

SIZE, BATCH, SEED = 32, 64, 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _supernet():
    """A tiny DS-MBNet after one epoch of stage I on digits (one process, seeded): the same on every rank."""
    torch.manual_seed(SEED)
    model = dsnet.create_model("ds_mbnet_tiny", num_classes=10)
    model.init_for_training()
    data = digits(SIZE)
    loader = torch.utils.data.DataLoader(data.train, batch_size=BATCH, shuffle=True,
                                         generator=torch.Generator().manual_seed(SEED), drop_last=True)
    train_supernet(model, loader, 1, lr=0.1, seed=SEED, calibration_batches=2)
    return model, data


def _stage2(world: World, weights: LossWeights, model, data, epochs: int = 1) -> dict:
    torch.set_num_threads(1)
    penalty = ComplexityPenalty.madds(model, SIZE, target=None)
    loader = shard_loader(data.train, BATCH, world, SEED)
    train_gate(model, loader, penalty, epochs, lr=0.05, weights=weights, seed=SEED, world=world)
    gate = {k: v.clone() for k, v in model.state_dict().items() if "route" in k}
    out = {"gate": gate}
    if world.main:
        out["accuracy"] = evaluate_gate(model, torch.utils.data.DataLoader(data.val, batch_size=256)).accuracy
    return out


def _worker(rank: int, size: int, port: int, weights: LossWeights, model_bytes: bytes, data, queue) -> None:
    import io
    import os

    # the model as bytes: a tensor handed to a spawned process is shared memory, and two ranks would
    # then step the same weights (torchrun's processes each load their own)
    model = torch.load(io.BytesIO(model_bytes), weights_only=False)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    world = World(rank, size, rank)
    start(world)
    try:
        # the penalty of the global batch: each rank its share of fixed one-hots, value and gradient
        g = torch.Generator().manual_seed(3)
        onehots = torch.nn.functional.one_hot(torch.randint(14, (8,), generator=g), 14).double()
        share = onehots[rank * 8 // size:(rank + 1) * 8 // size].clone().requires_grad_(True)
        penalty = ComplexityPenalty(torch.arange(1.0, 15.0), 14.0, "MAdds", "madds", target=3.0)
        value = penalty([share], world)
        value.backward()
        result = _stage2(world, weights, model, data)
        # plain lists: a tensor in a queue is a shared-memory handle, gone when this process ends
        result["gate"] = {k: v.tolist() for k, v in result["gate"].items()}
        queue.put((rank, float(value.detach()), share.grad.tolist(), result))
    finally:
        stop(world)


def _two_processes(weights: LossWeights, model, data) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    import io

    port, buffer = _free_port(), io.BytesIO()
    torch.save(model, buffer)
    procs = [ctx.Process(target=_worker, args=(r, 2, port, weights, buffer.getvalue(), data, queue))
             for r in range(2)]
    for p in procs:
        p.start()
    out = sorted(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return out


@pytest.fixture(scope="module")
def trained():
    return _supernet()


def _copy(model):
    import copy

    return copy.deepcopy(model)


def test_two_gloo_processes_train_the_gate_one_process_trains(trained):
    """With the SGS loss alone the step is deterministic (no Gumbel noise): two processes, each a
    half of every global batch, must give one process's gate to float tolerance, and the penalty
    of the global batch its value and gradients. With the full loss each rank draws its own Gumbel
    noise (seed + rank: equal noise would repeat the same draws on every rank's share), so the
    routes sampled differ from one process's and only the accuracy can agree, within its binomial
    noise on the 360 validation images."""
    model, data = trained
    sgs_only = LossWeights(cls=0.0, cp=0.0, sgs=1.0)
    one = _stage2(World.single(), sgs_only, _copy(model), data)
    (r0, v0, g0, two), (r1, v1, g1, _) = _two_processes(sgs_only, model, data)
    for k in one["gate"]:
        assert torch.allclose(one["gate"][k], torch.tensor(two["gate"][k]), atol=1e-6), k
    assert (r0, r1) == (0, 1)
    full = torch.nn.functional.one_hot(torch.randint(14, (8,), generator=torch.Generator().manual_seed(3)), 14)
    full = full.double().requires_grad_(True)
    penalty = ComplexityPenalty(torch.arange(1.0, 15.0), 14.0, "MAdds", "madds", target=3.0)
    expected = penalty([full])
    expected.backward()
    assert v0 == pytest.approx(expected.item()) and v1 == pytest.approx(expected.item())
    # each rank's gradient, averaged over the ranks as DistributedDataParallel averages them
    assert torch.allclose(torch.tensor(g0 + g1, dtype=torch.float64) / 2, full.grad)

    default = LossWeights()
    one = _stage2(World.single(), default, _copy(model), data)
    (_, _, _, two), _ = _two_processes(default, model, data)
    p, n = one["accuracy"], len(data.val)
    noise = 2 * (2 * p * (1 - p) / n) ** 0.5  # two standard errors of the difference of two accuracies
    assert abs(one["accuracy"] - two["accuracy"]) <= noise + 1e-9, (one["accuracy"], two["accuracy"], noise)


class _Interrupted(Exception):
    pass


def _stop_after_one(states: list):
    """An ``on_epoch`` that keeps the state (as a checkpoint file would: a copy) and stops the run."""
    import copy

    def on_epoch(state):
        states.append(copy.deepcopy(state))
        raise _Interrupted

    return on_epoch


def test_a_resumed_stage_ii_ends_where_an_uninterrupted_one_ends(trained):
    """The state after each epoch (model, optimizer, schedule, RNG) continues a run as if it never stopped."""
    model, data = trained
    penalty = ComplexityPenalty.madds(model, SIZE)
    loader = shard_loader(data.train, BATCH, World.single(), SEED)
    straight = _copy(model)
    train_gate(straight, loader, penalty, 2, seed=SEED)
    states = []
    with pytest.raises(_Interrupted):
        train_gate(_copy(model), loader, penalty, 2, seed=SEED, on_epoch=_stop_after_one(states))
    resumed = _copy(model)
    history = train_gate(resumed, loader, penalty, 2, seed=SEED, resume=states[-1])
    assert [h["epoch"] for h in history] == [1, 2]
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_resumed_stage_i_ends_where_an_uninterrupted_one_ends():
    torch.manual_seed(SEED)
    base = dsnet.create_model("ds_mbnet_tiny", num_classes=10)
    data = digits(SIZE)
    loader = shard_loader(torch.utils.data.Subset(data.train, range(256)), BATCH, World.single(), SEED)
    straight, resumed = _copy(base), _copy(base)
    train_supernet(straight, loader, 2, seed=SEED, calibration_batches=1)
    states = []
    with pytest.raises(_Interrupted):
        train_supernet(_copy(base), loader, 2, seed=SEED, calibration_batches=1, on_epoch=_stop_after_one(states))
    train_supernet(resumed, loader, 2, seed=SEED, calibration_batches=1, resume=states[-1])
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_the_launch_is_read_from_torchrun_variables_or_refused_in_one_line():
    assert world_from_env({}) is None
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert world_from_env(env) == World(1, 2, 1)
    with pytest.raises(DistributedError, match="MASTER_PORT not set"):
        world_from_env({k: v for k, v in env.items() if k != "MASTER_PORT"})
    with pytest.raises(DistributedError, match="outside WORLD_SIZE"):
        world_from_env({**env, "RANK": "2"})
    with pytest.raises(DistributedError, match="not divisible by the 3 processes"):
        World(0, 3, 0).split_batch(64)


AUDIT = '''
import os, sys
if os.environ.get("RANK", "0") != "0" and os.environ.get("AUDIT_RESULTS"):
    _root, _log = os.path.realpath(os.environ["AUDIT_RESULTS"]), os.environ["AUDIT_LOG"]
    _events = {"open", "os.mkdir", "os.rename", "os.remove", "os.listdir", "os.scandir", "sqlite3.connect",
               "shutil.rmtree", "os.chmod"}

    def _hook(event, args):
        if event in _events and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.path.realpath(os.fsdecode(args[0]))
            if path == _root or path.startswith(_root + os.sep):
                with open(_log, "a") as f:  # outside the results folder
                    f.write(f"{event} {path}\\n")

    sys.addaudithook(_hook)
'''


def test_torchrun_two_ranks_resume_after_a_killed_rank_and_only_rank_0_touches_the_results(tmp_path):
    """``torchrun --nproc_per_node 2 -m harness.retrain_gate``: rank 1 is killed after stage II's
    first epoch, the job fails; the same command then resumes after that epoch (the gate's history
    counts each epoch once). An audit hook in rank 1 records any file it opens, lists or writes under
    the results folder: none, in both runs."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    import psutil
    from test_retrain_cli import _fast_x86

    from dsnet.checkpoint import load_checkpoint, save_checkpoint

    root = Path(__file__).resolve().parent.parent
    model, _ = _supernet()
    supernet = save_checkpoint(tmp_path / "supernet.pt", model, {"num_classes": 10})
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(AUDIT)
    results, log = tmp_path / "results", tmp_path / "audit.log"
    profile = _fast_x86(tmp_path)  # the x86 profile with a short protocol: the flow is checked, not timings
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "AUDIT_RESULTS": str(results), "AUDIT_LOG": str(log),
           "TMPDIR": str(tmp_path)}  # torchrun's log folders (torchelastic_*) go with the test's, not into /tmp
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "-m", "harness.retrain_gate", "--model", "ds_mbnet_tiny", "--target", str(profile),
               "--input-size", "32", "--backend", "eager", "--checkpoint", str(supernet), "--penalty", "madds",
               "--gate-epochs", "3", "--batch-size", "64", "--out", str(results)]
    ws = results / "gate_retraining" / "ds_mbnet_tiny-digits-32px"
    partial = ws / "gate-madds-eager.partial.pt"
    job = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 400
    while not partial.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert partial.exists(), job.communicate()[0][-3000:]
    ranks = [p for p in psutil.Process(job.pid).children(recursive=True) if p.environ().get("RANK") == "1"]
    assert len(ranks) == 1
    ranks[0].kill()
    out, _ = job.communicate(timeout=300)
    assert job.returncode != 0, out[-3000:]
    assert not (ws / "gate-madds-eager.pt").exists()  # the stage did not finish
    again = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert "stage II (madds): resuming after epoch" in again.stderr
    _, meta = load_checkpoint(ws / "gate-madds-eager.pt")
    assert meta["resumed_after_epoch"] >= 1 and meta["processes"] == 2
    assert [h["epoch"] for h in meta["history"]] == [1, 2, 3]  # each epoch once
    assert not partial.exists()
    assert (results / "gate_retraining.csv").is_file()
    assert not log.exists(), log.read_text()  # rank 1 never opened, listed or wrote anything under the results


@pytest.mark.parametrize("change, pattern", [({"WORLD_SIZE": "3", "RANK": "0"}, "not divisible by the 3 processes"),
                                             ({"MASTER_PORT": None}, "MASTER_PORT not set")])
def test_a_launch_that_cannot_work_is_one_line_before_any_training(change, pattern, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    for k, v in change.items():
        env.pop(k) if v is None else env.__setitem__(k, v)
    r = subprocess.run([sys.executable, "-m", "harness.retrain_gate", "--model", "ds_mbnet_tiny", "--target", "x86",
                        "--backend", "eager", "--batch-size", "64", "--out", str(tmp_path / "results")],
                       capture_output=True, text=True, env=env, timeout=120, cwd=Path(__file__).resolve().parent.parent)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and pattern in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "results").exists()
