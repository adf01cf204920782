"""The build worker: a second process builds from the back of the list, its artifacts check as local
builds do, a crash fails only its build, closing it does not wait for a build, and a backend that
builds apart never builds in the measuring process."""

import os
import signal
import time

import pytest
import torch

import dsnet
from conftest import randomize
from harness.backends import get_backend
from harness.measure.build_worker import BuildJob, BuildWorker, Shared
from harness.measure.pipeline import ArtifactKey, trial, weights_fingerprint
from harness.targets import load_target

X86 = load_target("x86").resolve()
WAIT_S = 300  # for the worker's results (spawning it imports torch)


class DiesInTheWorker(torch.nn.Module):
    """A module whose forward kills the process it runs in, unless that is the test's."""

    def __init__(self, how: str):
        super().__init__()
        self.how, self.parent = how, os.getpid()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if os.getpid() != self.parent:
            if self.how == "segfault":
                os.kill(os.getpid(), signal.SIGSEGV)
            time.sleep(600)
        return self.conv(x)


@pytest.fixture(scope="module")
def routes():
    model = dsnet.reference_statistics(randomize(dsnet.create_model("ds_mbnet_tiny")))
    return [(str(r), dsnet.materialize(model, r)) for r in model.routes()[:3]]


def _job(backend, label, module, cache, x):
    key = ArtifactKey.of("ds_mbnet_tiny", label, backend, X86, "fp32", x, weights_fingerprint(module))
    return key, BuildJob(backend, module, x, X86, "fp32", key.directory(cache))


def _all_built(shared):
    # the test waits until the worker has taken every job (it takes them from the back): which
    # process builds what is otherwise a race, as it is meant to be
    for f in shared._results:
        f.result(timeout=WAIT_S)


def test_the_worker_builds_from_the_back_and_its_artifacts_check_as_local_builds(routes, tmp_path):
    backend, x = get_backend("torchscript"), torch.randn(1, 3, 32, 32)
    keyed = [_job(backend, label, m, tmp_path, x) for label, m in routes]
    with BuildWorker() as worker:
        shared = worker.share([job for _, job in keyed])
        assert shared.claim(0) is None  # the front is this process's
        shared._results[-1].result(timeout=WAIT_S)  # the worker has started and built the last one
        claims = [None] + [shared.claim(i) for i in range(1, len(keyed))]
    assert claims[-1] is not None and claims[-1].ok and claims[-1].details["cached"] is False
    # what the worker built, loaded and checked here: ok, counted as compiled (not cached), with
    # the worker's build time; what this process claimed, compiled here as ever
    for (key, _), (label, module), built in zip(keyed, routes, claims):
        result = trial(backend, module, x, X86, "fp32", key, tmp_path, built=built)
        assert result.ok, (label, result.error)
        assert result.details["cached"] is False
        if built is not None:
            assert result.details["build_process"] == "worker" and result.compile_s >= built.compile_s
        else:
            assert "build_process" not in result.details
    with pytest.raises(ValueError, match="in order"):
        BuildWorker().share([keyed[0][1], keyed[1][1]]).claim(1)


def test_a_crash_fails_only_its_build_and_a_fresh_worker_takes_the_next(routes, tmp_path):
    backend, x = get_backend("torchscript"), torch.randn(1, 3, 32, 32)
    (_, a), (_, b) = routes[:2]
    jobs = [_job(backend, "a", a, tmp_path, x)[1], _job(backend, "crash", DiesInTheWorker("segfault"), tmp_path, x)[1],
            _job(backend, "b", b, tmp_path, x)[1]]
    with BuildWorker() as worker:
        shared = worker.share(jobs)
        _all_built(shared)
        first, crashed, last = (shared.claim(i) for i in range(3))
    assert crashed.status == "compile_failed"
    assert crashed.error == "the build worker died while building this artifact (killed by SIGSEGV)"
    assert last.ok and first.ok  # built before the crash, and by the fresh worker after it
    assert backend.has_artifact(jobs[0].artifact_dir) and backend.has_artifact(jobs[2].artifact_dir)


def test_a_module_the_worker_cannot_receive_is_built_by_its_claimer(tmp_path):
    backend, x = get_backend("torchscript"), torch.randn(1, 3, 32, 32)
    unpicklable = DiesInTheWorker("segfault")
    unpicklable.hook = lambda: None  # a lambda attribute: torch.save cannot pickle it
    with BuildWorker() as worker:
        shared = worker.share([_job(backend, "u", unpicklable, tmp_path, x)[1]])
        with pytest.raises(Exception, match="not sent to the worker"):
            shared._results[0].result(timeout=WAIT_S)  # the worker took it and could not send it
        assert shared.claim(0) is None  # so it is this process's to build
        assert worker._process is None  # nothing was sent, so no worker was started


def test_closing_does_not_wait_for_a_build(tmp_path):
    backend, x = get_backend("torchscript"), torch.randn(1, 3, 32, 32)
    jobs = [_job(backend, str(i), DiesInTheWorker("hang"), tmp_path, x)[1] for i in range(2)]
    worker = BuildWorker()
    shared = worker.share(jobs)
    assert shared.claim(0) is None
    while worker._process is None or not worker._busy:  # the worker is building job 1 (its forward hangs)
        time.sleep(0.1)
    worker.close()  # kills the build: without that, this test would hang for the forward's 600 s
    stopped = shared.claim(1)
    assert stopped.status == "compile_failed" and stopped.error == "the build worker was stopped"


def test_claims_share_what_is_to_build_and_leave_the_holes_to_this_process(routes, tmp_path):
    """``claims`` over a list with holes (already built, nothing to build): a hole is never the worker's,
    the worker takes from the back, and every claim comes in order."""
    backend, x = get_backend("torchscript"), torch.randn(1, 3, 32, 32)
    jobs = [_job(backend, label, m, tmp_path, x)[1] for label, m in routes]
    with BuildWorker() as worker:
        built = worker.claims([jobs[0], None, jobs[1], None, jobs[2]])
        while worker._process is None or not worker._busy:  # the worker has taken the last job
            time.sleep(0.05)
        got = [built(n) for n in range(5)]
        assert worker.claims([jobs[0], None])(0) is None  # one job to build: nothing is shared
    assert got[0] is None and got[1] is None and got[3] is None
    assert got[4] is not None and got[4].ok and backend.has_artifact(jobs[2].artifact_dir)  # the worker's


def _apart(backend):
    backend.build_apart = True  # as TVM's on a CPU
    return backend


def test_the_worker_takes_the_jobs_to_build_apart_first_in_order_then_the_rest_from_the_back(routes, tmp_path):
    x = torch.randn(1, 3, 32, 32)
    plain, apart = get_backend("torchscript"), _apart(get_backend("torchscript"))
    module = routes[0][1]
    jobs = [_job(b, str(i), module, tmp_path, x)[1] for i, b in enumerate([apart, plain, apart, plain, plain])]
    assert [job.apart for job in jobs] == [True, False, True, False, False]
    shared = Shared(jobs)  # no worker serves it: the order alone
    assert shared.claim(0) is None  # reached here before the worker took it: a second worker's (claims)
    assert shared._take() == 2  # the next to build apart, though this process is nearer to it
    assert shared._take() == 4 and shared._take() == 3  # then from the back
    assert shared.claim(1) is None  # not taken: this process builds it
    assert shared._take() is None
    lone = Shared([jobs[1], jobs[0]], share_all=False)  # one core, or one job: only what is built apart
    assert lone._take() == 1 and lone._take() is None


def test_a_backend_that_builds_apart_never_builds_in_this_process(routes, tmp_path, monkeypatch):
    """Every job of such a backend is built by a worker, a list of one included, and what the workers
    built loads and checks here; this process's ``compile`` is never called."""
    backend, x = _apart(get_backend("torchscript")), torch.randn(1, 3, 32, 32)

    def refuse(*args, **kwargs):
        raise AssertionError("built in the measuring process")

    monkeypatch.setattr(backend, "compile", refuse)  # the workers configure backends of their own
    keyed = [_job(backend, label, m, tmp_path, x) for label, m in routes]
    lone = _job(backend, "lone", routes[0][1], tmp_path, x)
    by_second = _job(backend, "second", routes[1][1], tmp_path, x)
    with BuildWorker() as worker:
        built = worker.claims([job for _, job in keyed])
        got = [built(n) for n in range(len(keyed))]
        got.append(worker.claims([lone[1]])(0))
        got.append(worker.build(by_second[1]))  # what claims does with a job reached before the worker
        assert worker._second is not None
    modules = [m for _, m in routes] + [routes[0][1], routes[1][1]]
    for (key, _), module, b in zip([*keyed, lone, by_second], modules, got):
        assert b is not None and b.ok, b
        result = trial(backend, module, x, X86, "fp32", key, tmp_path, built=b)
        assert result.ok and result.details["build_process"] == "worker", result.error


def test_a_dynamic_engine_built_alongside_the_worker_has_every_part_and_equals_eager(tmp_path):
    """With a worker, every part of the tiny DS-MBNet is built up front (some by the worker, loaded and
    checked here) and the deployed path gives the eager network's logits and routes."""
    from harness.deploy.engine import DynamicEngine
    from harness.measure.pipeline import check_output

    model = dsnet.reference_statistics(randomize(dsnet.create_model("ds_mbnet_tiny"))).eval()
    plan = dsnet.split(model)
    with BuildWorker() as worker:
        engine = DynamicEngine(plan, get_backend("torchscript"), X86, "fp32", tmp_path, 32, worker=worker)
    names = {k.split("@")[0] for k in engine.parts}
    assert names == {"head"} | {plan.segment_name(k, key) for k, stage in enumerate(plan.stages) for key in stage}
    assert any(r.details.get("build_process") == "worker" for r in engine.parts.values())
    assert all(r.ok for r in engine.parts.values())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref_logits, ref_choices = plan(x)
    built_parts = len(engine.parts)
    logits, choices = engine(x)
    assert check_output(logits, ref_logits, "fp32") is None and torch.equal(choices, ref_choices)
    assert len(engine.parts) == built_parts  # nothing left to build on first use


def test_a_dynamic_phase_on_a_backend_that_builds_apart_builds_nothing_in_this_process(tmp_path, monkeypatch):
    """The deployed network's parts and one artifact (shared with the worker) and the static engines
    the phase times beside them (built on their own) all come from the build workers."""
    from harness.measure.protocol import Protocol
    from harness.phases.context import RunContext
    from harness.phases.dynamic import DynamicPhase
    from harness.results.layout import Layout
    from harness.results.store import ResultStore

    store = ResultStore(tmp_path / "results.sqlite")
    ctx = RunContext(X86, Layout(tmp_path), Protocol(warmup_calls=1, warmup_ms=0, repeat=2, min_repeat_ms=0,
                                                     budget_s=0), store, "cpu", False, "test")
    backend = _apart(ctx.backend("torchscript"))

    def refuse(*args, **kwargs):
        raise AssertionError("built in the measuring process")

    monkeypatch.setattr(backend, "compile", refuse)
    with BuildWorker() as worker:
        phase = DynamicPhase(ctx, "ds_mbnet_tiny", "torchscript", "fp32", 32, worker=worker)
        static = phase._static(phase.routes[0])
        one = phase._one_built
    store.close()
    assert static.ok and static.details["build_process"] == "worker", static.error
    assert one is not None and one.ok
    assert phase.engine.parts and all(r.ok and r.details.get("build_process") == "worker"
                                      for r in phase.engine.parts.values())
