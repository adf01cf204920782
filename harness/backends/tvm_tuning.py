"""MetaSchedule tuning of TVM builds within a time budget: one database, resumable, honest labels.

Contract
--------
:class:`TuningDatabase` ``(directory, tvm_target)`` is one folder (``<results>/tvm_tuning/``): the
MetaSchedule JSON database (anchor-block equality, so a record tuned for a convolution with one
fused epilogue serves the same convolution with another) and ``ledger.json``, written atomically
after every task: the TVM target the records were tuned for, per task the trials and seconds spent
and its best measured time, the budget plan, and the budget spent per set of networks and
settings (``spent``, noted by :func:`harness.phases.tuning.run_tuning`). The records are read on
first use, not for the ledger. Builds read :meth:`TuningDatabase.best_of`: the best record of
each workload, pruned into ``best/`` whenever the records changed (tuning keeps every measured
candidate: many records per workload). A database tuned for another TVM target is
``foreign``: it is neither applied nor extended, and :meth:`TuningDatabase.foreign` says why in
one line.

:func:`collect_tasks` gathers the distinct tasks of many Relax modules (weights summed over every
module that uses them). :func:`tune` spends a budget in seconds:

1. every task without records gets ``first_trials`` (one search iteration), largest
   FLOPs x weight first: an untuned layer dominates a tuned network, so each gets some schedule;
2. the rest of the budget is spread over the tasks by their share of the networks' latency
   (weight x best measured time after step 1), converted to trials with the seconds per trial
   measured so far; the plan is stored, so a re-run with the same budget tunes nothing and a
   larger budget tunes only the difference.

Each task is tuned by its own ``tune_tasks`` call; MetaSchedule commits records as they are
measured, so kill -9 keeps them, and a task whose ledger entry was not written is tuned again.
:func:`module_status` says how many of a module's tasks the database holds (the label of a
``lut.csv`` row: untuned, partly tuned k/n, tuned) and which records serve them.

Shipped records (:class:`ShippedRecords`, a folder in the repository named by the profile's ``[tvm]
shipped_records``): the best record per workload of a database tuned elsewhere, MetaSchedule's two
JSON files xz-compressed (TVM's serialized workloads shrink ~100x: the x86 profile's 37 MB to 0.17
MB), with ``about.json`` (the TVM version and target they were tuned with, the CPU features their
schedules need, the networks they cover). They are unpacked per process into a private temporary
folder, never into a cache another user or a copied results folder could change. A build applies the
results folder's own records first and the shipped ones for the workloads it lacks (MetaSchedule's
``OrderedUnionDatabase``: no record is ranked against a time measured on another machine); records
tuned with another TVM version, or needing a feature this CPU lacks, are refused in one line and not
applied. :func:`ship_records` writes such a folder from a results folder's database;
``about.json``'s ``covers`` lists the runs (models, input size, a signature of their tasks) whose
every task the records were checked to cover (``harness.tune --vouch``), so such a run skips
extracting its tasks (:meth:`ShippedRecords.vouched`).

MetaSchedule lives in ``tvm.s_tir.meta_schedule`` in TVM 0.27. The search ranks candidates with
MetaSchedule's XGBoost cost model (``xgboost``, a dependency of the harness); without the package,
or with ``SearchSettings(cost_model="random")``, it measures random picks of the evolved population.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import json
import logging
import lzma
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

LEDGER = "ledger.json"
ABOUT = "about.json"  # beside shipped records: what they were tuned with, for, and on
# The x86-64 microarchitecture levels (the psABI's, as LLVM names them) and the CPU features, as Linux's
# /proc/cpuinfo names them, that code built for each may use: the baselines records are shipped for.
_V2 = ("cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3")
_V3 = _V2 + ("abm", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "xsave")
BASELINE_CPU_FLAGS = {"x86-64-v2": _V2, "x86-64-v3": _V3,
                      "x86-64-v4": _V3 + ("avx512bw", "avx512cd", "avx512dq", "avx512f", "avx512vl")}
RECORD_FILES = ("database_workload.json", "database_tuning_record.json")  # MetaSchedule's JSONDatabase
SHIPPED_FILES = tuple(f"{name}.xz" for name in RECORD_FILES)  # as shipped records hold them
BEST = "best"  # subfolder: the best record per workload (TuningDatabase.best_of)
PRUNED_FROM = "pruned_from.json"  # in BEST: the sizes and times of the records it was pruned from
EQUALITY = "anchor-block"


@dataclass(frozen=True)
class SearchSettings:
    """Search settings sized for a small machine (2 cores): small populations and iterations, one
    short measurement per candidate. ``first_trials``: step 1's trials per task."""

    first_trials: int = 16
    trials_per_iter: int = 16
    max_trials_per_task: int = 256
    population: int = 128
    genetic_iters: int = 2
    number: int = 2  # evaluator: calls per repeat
    repeat: int = 1
    min_repeat_ms: int = 20
    builder_workers: int | None = None  # default: the machine's cores
    timeout_s: float = 30.0
    cost_model: str = ""  # "xgb" or "random"; empty: XGBoost where the package is installed

    def cost_model_name(self) -> str:
        if self.cost_model:
            return self.cost_model
        return "xgb" if importlib.util.find_spec("xgboost") else "random"

    def strategy(self):
        from tvm.s_tir import meta_schedule as ms

        return ms.search_strategy.EvolutionarySearch(population_size=self.population, init_min_unmeasured=16,
                                                     genetic_num_iters=self.genetic_iters)

    def evaluator(self):
        from tvm.s_tir import meta_schedule as ms

        return ms.runner.EvaluatorConfig(number=self.number, repeat=self.repeat, min_repeat_ms=self.min_repeat_ms)


@dataclass
class Task:
    """One distinct tuning task: its database key, a name, the weight summed over all modules that
    use it, its FLOPs and the extracted task (what MetaSchedule tunes)."""

    key: str
    name: str
    weight: int
    flops: float
    extracted: object = field(repr=False)


@dataclass(frozen=True)
class TuningStatus:
    tuned: int  # tasks with a record, local or shipped
    tasks: int
    trials: int
    shipped: int = 0  # of ``tuned``, those served by shipped records

    @property
    def label(self) -> str:
        if self.tuned == 0:
            return "untuned"
        return "tuned" if self.tuned == self.tasks else f"partly tuned ({self.tuned}/{self.tasks})"

    @property
    def records(self) -> str:
        """Which records built it: ``local``, ``shipped``, ``local + shipped`` or ``none``."""
        local = self.tuned - self.shipped
        return " + ".join(n for n, k in (("local", local), ("shipped", self.shipped)) if k) or "none"

    def details(self) -> dict:
        return {"tuning": self.label, "tuned_tasks": self.tuned, "tasks": self.tasks, "tune_trials": self.trials,
                "records": self.records}


class TuningDatabase:
    def __init__(self, directory: Path, tvm_target, records: Path | None = None):
        self.directory, self.target = Path(directory), tvm_target
        self.records = Path(records) if records is not None else self.directory
        self.target_text = str(tvm_target)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ledger = self._read_ledger()

    @functools.cached_property
    def ms(self):
        """The MetaSchedule database of ``records``, read on first use (the ledger alone tells
        whether the database is foreign or its budget spent)."""
        from tvm.s_tir import meta_schedule as ms

        try:
            return ms.database.JSONDatabase(work_dir=str(self.records), module_equality=EQUALITY)
        except Exception as e:  # a truncated or foreign file: TVM raises its own error types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            remedy = ("delete it to prune it again from the records" if self.records != self.directory
                      else "move the folder away to tune afresh")
            raise ValueError(f"tuning database in {self.records} is unreadable ({first}); {remedy}") from None

    @classmethod
    def existing(cls, directory: Path | None, tvm_target) -> TuningDatabase | None:
        """The database in ``directory``, or None when nothing was ever tuned there."""
        if directory is None or not (Path(directory) / "database_workload.json").is_file():
            return None
        return cls(directory, tvm_target)

    @classmethod
    def best_of(cls, directory: Path | None, tvm_target) -> TuningDatabase | None:
        """What builds read: the best record of each workload (``best/``, pruned again whenever the
        records changed since) with the ledger of ``directory``; None when nothing was tuned there.
        Tuning keeps every measured record (its cost model learns from them); a build applies only
        the best, a small fraction of the JSON to read."""
        full = cls.existing(directory, tvm_target)
        if full is None or full.foreign():
            return full  # a foreign database is not applied: nothing to prune
        source = json.dumps(files_stamp(full.directory, RECORD_FILES))
        best = full.directory / BEST
        if not ((best / PRUNED_FROM).is_file() and (best / PRUNED_FROM).read_text() == source):
            from tvm.s_tir import meta_schedule as ms

            records = full.ms  # an unreadable database says so here, before anything is written
            fresh = Path(tempfile.mkdtemp(dir=full.directory, prefix=f".{BEST}-"))
            try:
                fresh.chmod(0o755)  # as the folder around it, not mkdtemp's owner-only
                records.dump_pruned(ms.database.JSONDatabase(work_dir=str(fresh), module_equality=EQUALITY))
                (fresh / PRUNED_FROM).write_text(source)
                shutil.rmtree(best, ignore_errors=True)
                try:
                    os.rename(fresh, best)
                except OSError:  # another process pruned the same records at the same time
                    shutil.rmtree(fresh, ignore_errors=True)
            except BaseException:
                shutil.rmtree(fresh, ignore_errors=True)
                raise
        return cls(directory, tvm_target, records=best)

    def _read_ledger(self) -> dict:
        path = self.directory / LEDGER
        if not path.is_file():
            return {"target": self.target_text, "tasks": {}, "plans": {}}
        try:
            ledger = json.loads(path.read_text())
            if not isinstance(ledger.get("tasks"), dict):
                raise ValueError("no task table")
        except (OSError, ValueError) as e:
            raise ValueError(f"tuning ledger {path} is unreadable ({e}); move the folder away to tune afresh") from None
        ledger.setdefault("plans", {})
        return ledger

    def _write_ledger(self) -> None:
        _write_json(self.directory / LEDGER, self.ledger)

    def foreign(self) -> str | None:
        """Why the records must not be used for this target (None: they may)."""
        tuned_for = self.ledger.get("target")
        if tuned_for and tuned_for != self.target_text:
            return f"the TVM tuning database in {self.directory} was tuned for {tuned_for}, not {self.target_text}"
        return None

    def key(self, mod) -> str:
        """A task's key in the ledger: the anchor-block hash of its workload."""
        return _probe_key(mod)

    def best_ms(self, mod) -> float | None:
        """Best measured time of ``mod`` in the database (ms), None without a record."""
        if not self.ms.has_workload(mod):
            return None
        top = self.ms.get_top_k(self.ms.commit_workload(mod), 1)
        if not top or not top[0].run_secs:
            return None
        secs = [float(s) for s in top[0].run_secs]
        return 1e3 * sum(secs) / len(secs)

    def spent(self, signature: str) -> dict | None:
        """What :meth:`note_spent` noted for ``signature`` (a set of networks and settings), if anything."""
        return self.ledger.get("spent", {}).get(signature)

    def note_spent(self, signature: str, note: dict) -> None:
        """Note (written at once) that ``note["budget_s"]`` was spent on the tasks of ``signature``."""
        self.ledger.setdefault("spent", {})[signature] = note
        self._write_ledger()

    def entry(self, key: str) -> dict:
        return self.ledger["tasks"].setdefault(key, {"trials": 0, "seconds": 0.0})


def files_stamp(directory: Path | None, names: tuple[str, ...] | None = None) -> tuple:
    """``(name, mtime_ns, size)`` of every file directly in ``directory`` (or of those ``names``):
    changes when any is rewritten."""
    if directory is None or not Path(directory).is_dir():
        return ()
    paths = [p for p in Path(directory).iterdir() if names is None or p.name in names]
    stats = ((p.name, p.stat()) for p in paths if p.is_file())
    return tuple(sorted((name, st.st_mtime_ns, st.st_size) for name, st in stats))


def _probe_key(mod) -> str:
    """The anchor-block hash of a workload the database does not hold yet (an in-memory database)."""
    from tvm.s_tir import meta_schedule as ms

    return str(ms.database.MemoryDatabase(module_equality=EQUALITY).commit_workload(mod).as_json()[0])


def extract(mod, tvm_target) -> list:
    from tvm.s_tir import meta_schedule as ms

    return list(ms.relax_integration.extract_tasks(mod, tvm_target, module_equality=EQUALITY))


def collect_tasks(modules, tvm_target) -> list[Task]:
    """The distinct tasks of several Relax modules (after the zero pipeline), weights summed."""
    from tvm.s_tir.analysis import estimate_tir_flops

    tasks: dict[str, Task] = {}
    for mod in modules:
        for t in extract(mod, tvm_target):
            key = _probe_key(t.dispatched[0])
            if key in tasks:
                tasks[key].weight += int(t.weight)
            else:
                try:
                    flops = float(estimate_tir_flops(t.dispatched[0]))
                except Exception:  # an op the estimator does not know: counted as tiny
                    flops = 1.0
                tasks[key] = Task(key, t.task_name, int(t.weight), flops, t)
    return list(tasks.values())


def module_status(db: TuningDatabase | None, mod, tvm_target, shipped: TuningDatabase | None = None) -> TuningStatus:
    """How many of ``mod``'s tasks ``db`` (or, for those it lacks, ``shipped``) holds a record for,
    and the trials spent on them here."""
    tasks = extract(mod, tvm_target)
    local = None if db is None or db.foreign() else db
    tuned, trials, from_shipped = 0, 0, 0
    for t in tasks:
        if local is not None and local.best_ms(t.dispatched[0]) is not None:
            tuned += 1
            trials += int(local.ledger["tasks"].get(local.key(t.dispatched[0]), {}).get("trials", 0))
        elif shipped is not None and shipped.best_ms(t.dispatched[0]) is not None:
            tuned += 1
            from_shipped += 1
    return TuningStatus(tuned, len(tasks), trials, from_shipped)


def apply_records(mod, tvm_target, databases: list[TuningDatabase]):
    """``mod`` (after the zero pipeline) with every function that ``databases`` hold a record for
    replaced by its schedule: the first database holding a workload serves it."""
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    union = databases[0].ms if len(databases) == 1 else ms.database.OrderedUnionDatabase(*[d.ms for d in databases])
    with tvm_target, union, tvm.transform.PassContext(opt_level=3):
        return relax.transform.MetaScheduleApplyDatabase()(mod)


def host_cpu_flags() -> set[str]:
    """The CPU feature flags Linux reports for this machine (``/proc/cpuinfo``); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):  # x86, aarch64
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


class ShippedRecords:
    """Tuning records shipped in the repository (see the module's contract): ``directory`` holds
    MetaSchedule's two JSON files (the best record per workload) and :data:`ABOUT`."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        path = self.directory / ABOUT
        try:
            self.about = json.loads(path.read_text())
            if not isinstance(self.about, dict) or not isinstance(self.about.get("tvm"), str):
                raise ValueError("no TVM version")
        except (OSError, ValueError) as e:
            raise ValueError(f"shipped TVM records {self.directory}: {ABOUT} is missing or unreadable ({e})") from None
        missing = [f for f in SHIPPED_FILES if not (self.directory / f).is_file()]
        if missing:
            raise ValueError(f"shipped TVM records {self.directory}: {', '.join(missing)} missing")

    def refusal(self, tvm_version: str | None = None, cpu_flags: set[str] | None = None) -> str | None:
        """Why these records must not build here (one line), None when they may."""
        import tvm

        version = tvm_version or tvm.__version__
        if self.about["tvm"] != version:
            return (f"the shipped TVM records in {self.directory} were tuned with TVM {self.about['tvm']}, "
                    f"this is TVM {version}: not applied")
        flags = host_cpu_flags() if cpu_flags is None else cpu_flags
        lacking = sorted(set(self.about.get("cpu_flags", [])) - flags)
        if lacking:
            return (f"the shipped TVM records in {self.directory} need CPU features this CPU lacks "
                    f"({', '.join(lacking)}): not applied")
        return None

    def vouched(self, task_signature: str) -> dict | None:
        """``{"tasks", "networks", ...}`` when :data:`ABOUT` vouches that these records cover every task
        of ``task_signature`` (:func:`harness.phases.tuning.task_signature`), else None."""
        for entry in self.about.get("covers", []):
            if isinstance(entry, dict) and entry.get("signature") == task_signature \
                    and isinstance(entry.get("tasks"), int) and isinstance(entry.get("networks"), int):
                return entry
        return None

    def vouch(self, entry: dict) -> None:
        """Write into :data:`ABOUT` that these records cover every task of ``entry["signature"]``
        (``entry`` also names the models, input size and counts), replacing an entry for the same
        models, input size and dynamic parts. The caller has checked it."""
        same = ("models", "input_size", "dynamic")
        covers = [e for e in self.about.get("covers", []) if any(e.get(k) != entry[k] for k in same)]
        self.about = {**self.about, "covers": covers + [entry]}
        _write_json(self.directory / ABOUT, self.about)

    def database(self, tvm_target) -> TuningDatabase:
        """The records as a database builds read: unpacked into a temporary folder of this process
        (removed at exit), its ledger in memory (never written)."""
        unpacked = Path(tempfile.mkdtemp(prefix="dsnet-harness-tvm-records-"))
        atexit.register(shutil.rmtree, unpacked, True)
        for packed, name in zip(SHIPPED_FILES, RECORD_FILES):
            try:
                with lzma.open(self.directory / packed) as src, open(unpacked / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except (OSError, lzma.LZMAError, EOFError) as e:
                raise ValueError(f"shipped TVM records {self.directory}: {packed} is unreadable ({e})") from None
        return TuningDatabase(unpacked, tvm_target)


def _write_json(path: Path, data: dict) -> None:
    """``data`` at ``path`` whole or not at all (written beside it, then renamed)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def ship_records(database_dir: Path, tvm_target, out_dir: Path, cpu_flags: list[str], about: dict) -> Path:
    """Write the best record per workload of the database in ``database_dir`` (tuned for
    ``tvm_target``) into ``out_dir`` as shipped records: MetaSchedule's two files xz-compressed
    (:data:`SHIPPED_FILES`) and :data:`ABOUT` (``about`` plus the TVM version, the target and the
    ``cpu_flags`` the schedules need)."""
    import tvm

    best = TuningDatabase.best_of(database_dir, tvm_target)
    if best is None:
        raise ValueError(f"no tuning database in {database_dir}")
    why = best.foreign()
    if why:
        raise ValueError(why)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, packed in zip(RECORD_FILES, SHIPPED_FILES):
        with open(best.records / name, "rb") as src, lzma.open(out_dir / packed, "wb", preset=9) as dst:
            shutil.copyfileobj(src, dst)
    _write_json(out_dir / ABOUT, {**about, "tvm": tvm.__version__, "target": str(tvm_target),
                                  "cpu_flags": sorted(cpu_flags)})
    return out_dir


def import_tensor_intrinsics() -> None:
    """Import TVM's tensor intrinsics (MetaSchedule needs them registered) in a few seconds rather
    than ~30: their TVMScript parser calls ``inspect.stack()``, and for every frame of the import
    machinery (``<frozen importlib...>``, no file on disk) ``inspect.getmodule`` scans all of
    ``sys.modules`` again. Naming those two modules in inspect's own cache ends the scans."""
    import inspect

    for name in ("importlib._bootstrap", "importlib._bootstrap_external"):
        inspect.modulesbyfile.setdefault(f"<frozen {name}>", name)
    import tvm.s_tir.tensor_intrin  # noqa: F401


def _build_without_intrinsics():
    """MetaSchedule's default build minus its import of the tensor intrinsics, which costs each
    builder worker ~30 s (workers live for one search iteration). A candidate arrives scheduled,
    tensorized blocks included, so building it needs no registered intrinsic. Nested, so it is
    pickled by value: the workers never import the harness (or torch)."""

    def build(mod, target, _params):
        from tvm.driver import build as tvm_build
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

        return tvm_build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)

    return build


RECYCLE_BUILDS = 512  # builder workers are replaced after this many builds (TVM: PopenPool workers leak memory)


def pooled_builder(max_workers: int | None, timeout_s: float, f_build, f_export=None):
    """A MetaSchedule builder whose worker processes outlive a search iteration. TVM's
    ``LocalBuilder`` starts fresh workers for every iteration (against a memory leak of long-lived
    workers); each then imports TVM again, ~3.5 s of a 2-core machine's ~6 s iteration. This one
    keeps them for :data:`RECYCLE_BUILDS` builds."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import _serialize_params, _worker_func
    from tvm.s_tir.meta_schedule.utils import cpu_count
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    workers = max_workers or cpu_count(logical=True)

    @derived_object
    class PooledBuilder(PyBuilder):
        def __init__(self):
            super().__init__()
            self.pool, self.builds = None, 0

        def build(self, build_inputs):
            if self.pool is None or self.builds >= RECYCLE_BUILDS:
                if self.pool is not None:
                    self.pool.shutdown()
                self.pool, self.builds = PopenPoolExecutor(max_workers=workers, timeout=timeout_s), 0
            self.builds += len(build_inputs)
            args = [(f_build, f_export, b.mod, b.target, _serialize_params(b.params)) for b in build_inputs]
            results = []
            for r in self.pool.map_with_error_catching(lambda a: _worker_func(*a), args):
                if r.status == StatusKind.COMPLETE:
                    results.append(BuilderResult(r.value, None))
                elif r.status == StatusKind.TIMEOUT:
                    results.append(BuilderResult(None, f"builder: timeout, killed after {timeout_s} s"))
                else:
                    results.append(BuilderResult(None, f"builder: an exception occurred\n{r.value}"))
            return results

    return PooledBuilder()


def local_builder_runner(search: SearchSettings):
    """This machine's builder and runner, made once per tuning session: both keep their worker
    processes from task to task."""
    from tvm.s_tir import meta_schedule as ms

    builder = pooled_builder(search.builder_workers, search.timeout_s, _build_without_intrinsics())
    runner = ms.runner.LocalRunner(timeout_sec=search.timeout_s, evaluator_config=search.evaluator())
    return builder, runner


def _tune_one(db: TuningDatabase, task: Task, trials: int, search: SearchSettings, builder, runner) -> float:
    """Tune ``task`` for ``trials`` more trials; returns the seconds it took."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.relax_integration import extracted_tasks_to_tune_contexts

    import_tensor_intrinsics()
    # MetaSchedule's console handler takes the level its logger has when tuning starts: WARNING
    # keeps per-trial tables off stdout (the run's summary); the logs/ files keep everything
    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    if ms_logger.level in (logging.NOTSET, logging.DEBUG):
        ms_logger.setLevel(logging.WARNING)
    # its set-up names the logger's handlers in a dictConfig: an unnamed one (a capture handler
    # pytest leaves behind) makes it fail, so only named handlers stay on MetaSchedule's own logger
    ms_logger.handlers = [h for h in ms_logger.handlers if h.get_name()]
    contexts, weights = extracted_tasks_to_tune_contexts([task.extracted], str(db.directory),
                                                         strategy=search.strategy())
    if not contexts:  # already scheduled by the frontend: nothing to tune
        return 0.0
    cost_model = search.cost_model_name()
    t0 = time.monotonic()
    ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(db.directory), max_trials_global=trials,
                  max_trials_per_task=trials, num_trials_per_iter=min(search.trials_per_iter, trials),
                  database=db.ms, builder=builder, runner=runner, cost_model=cost_model,
                  module_equality=EQUALITY)
    return time.monotonic() - t0


def _spend(db: TuningDatabase, task: Task, trials: int, search, builder, runner) -> float:
    seconds = _tune_one(db, task, trials, search, builder, runner)
    entry = db.entry(task.key)
    entry.update(name=task.name, trials=entry["trials"] + trials, seconds=entry["seconds"] + seconds,
                 best_ms=db.best_ms(task.extracted.dispatched[0]))
    db._write_ledger()
    return seconds


def plan_trials(tasks: list[Task], shares: dict[str, float], trials_total: int, search: SearchSettings) -> dict:
    """``trials_total`` spread over ``tasks`` by ``shares`` (fractions summing to 1), in whole
    search iterations, each task capped at ``max_trials_per_task``."""
    out = {}
    for t in tasks:
        n = shares.get(t.key, 0.0) * trials_total
        n = search.trials_per_iter * round(n / search.trials_per_iter)
        out[t.key] = int(min(search.max_trials_per_task, max(search.first_trials, n)))
    return out


def tune(db: TuningDatabase, tasks: list[Task], budget_s: float, search: SearchSettings | None = None,
         builder=None, runner=None, progress_factory: Callable[[int, str], Callable] | None = None) -> dict:
    """Spend ``budget_s`` seconds in all (this call and earlier ones on the same tasks) tuning
    ``tasks`` into ``db`` (see the module docstring); returns what this call did: tasks, tasks
    tuned, trials and seconds spent. ``progress_factory(total, name)`` makes a progress callback
    ``(label, text)`` per step; a step is one task tuned."""
    search = search or SearchSettings()
    why = db.foreign()
    if why:
        raise ValueError(f"{why}: tune into another results folder, or move the folder away")
    db.ledger["target"] = db.target_text
    if builder is None or runner is None:
        local_builder, local_runner = local_builder_runner(search)
        builder, runner = builder or local_builder, runner or local_runner
    start, done_now, trials_now = time.monotonic(), 0, 0
    spent_before = sum(db.ledger["tasks"].get(t.key, {}).get("seconds", 0.0) for t in tasks)
    left = lambda: budget_s - spent_before - (time.monotonic() - start)  # noqa: E731
    # 1. a first iteration for every task without one, largest first
    trials_of = lambda t: db.ledger["tasks"].get(t.key, {}).get("trials", 0)  # noqa: E731
    first = [t for t in tasks if trials_of(t) < search.first_trials]
    first.sort(key=lambda t: -t.flops * t.weight)
    progress = progress_factory(len(first), "tuning, first pass") if progress_factory and first else None
    for t in first:
        if left() <= 0:
            break
        _spend(db, t, search.first_trials, search, builder, runner)
        done_now, trials_now = done_now + 1, trials_now + search.first_trials
        if progress:
            progress(t.name, f"{_best(db, t)}, {max(0, left()) / 60:.1f} min left")
    # 2. the rest of the budget by share of latency, as a stored plan
    plan_key = f"{round(budget_s)}s:" + ",".join(sorted(t.key for t in tasks))
    plan = db.ledger["plans"].get(plan_key)
    if plan is None and all(trials_of(t) >= search.first_trials for t in tasks):
        spent = sum(db.entry(t.key)["seconds"] for t in tasks)
        trials = sum(db.entry(t.key)["trials"] for t in tasks)
        per_trial = spent / max(1, trials)
        cost = {t.key: t.weight * (db.entry(t.key).get("best_ms") or 0.0) for t in tasks}
        total = sum(cost.values()) or 1.0
        remaining_trials = max(0, int((budget_s - spent) / per_trial)) if per_trial > 0 else 0
        plan = plan_trials(tasks, {k: v / total for k, v in cost.items()}, trials + remaining_trials, search)
        db.ledger["plans"] = {plan_key: plan}  # one plan at a time: the newest budget
        db._write_ledger()
    if plan:
        todo = [t for t in tasks if plan.get(t.key, 0) > trials_of(t)]
        todo.sort(key=lambda t: -(plan[t.key] - trials_of(t)))
        progress = progress_factory(len(todo), "tuning by share") if progress_factory and todo else None
        for t in todo:
            if left() <= 0:
                break
            more = plan[t.key] - trials_of(t)
            _spend(db, t, more, search, builder, runner)
            done_now, trials_now = done_now + 1, trials_now + more
            if progress:
                progress(f"{t.name} +{more} trials", f"{_best(db, t)}, {max(0, left()) / 60:.1f} min left")
    return {"tasks": len(tasks), "tuned_now": done_now, "trials_now": trials_now,
            "seconds_now": round(time.monotonic() - start, 1)}


def _best(db: TuningDatabase, t: Task) -> str:
    best = db.entry(t.key).get("best_ms")
    return f"best {best:.3f} ms" if best is not None and math.isfinite(best) else "no valid schedule yet"
