"""``tvm``: ``torch.export`` -> Relax (``from_exported_program``) -> build for the profile's target.

Options (the profile's ``[tvm]`` table, checked here): ``target``, a TVM 0.27 target dict, e.g.
``{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "auto", "num-cores": 0}`` (``auto``: the
host CPU as LLVM names it; ``0`` cores: the profile's thread count); ``tune_trials``, MetaSchedule
trials per task (0: untuned); ``host``, the host target of a GPU build. CPU builds are untuned
unless ``tune_trials > 0``: then MetaSchedule tunes with a database in the backend's ``workdir``
(``<results>/tvm_tuning/``), shared by every route, and only workloads the database does not hold
yet are tuned, so each distinct layer is tuned once and a re-run tunes nothing; the engine's
``details`` say how many tasks this compile tuned. CUDA builds apply DLight's default GPU
schedules. ``export`` writes the library only, cross-compiled when the target is another
architecture (``harness.measure.remote`` runs it on a board); :func:`cross_compiler` finds the
cross compiler or says what to install.
"""

from __future__ import annotations

import platform
import shutil
from pathlib import Path

import torch

from harness.backends.base import Backend, Engine, Exported, as_torch_outputs, cast, input_caster

ARCH_OF_TRIPLE = {"aarch64": "aarch64", "arm64": "aarch64", "x86_64": "x86_64"}
CROSS_COMPILERS = {"aarch64": "aarch64-linux-gnu-g++"}
INSTALL_HINT = {"aarch64": "install Debian's g++-aarch64-linux-gnu (apt-get install g++-aarch64-linux-gnu)"}


class CrossCompileError(RuntimeError):
    """No way to build for the target's architecture here (one line with what to install)."""


def host_arch() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def target_arch(tvm_target: dict) -> str:
    triple = str(tvm_target.get("mtriple", ""))
    return ARCH_OF_TRIPLE.get(triple.split("-")[0], host_arch()) if triple else host_arch()


def cross_compiler(tvm_target: dict):
    """``None`` for a native build, else the cross ``fcompile``; :class:`CrossCompileError` if missing."""
    arch = target_arch(tvm_target)
    if arch == host_arch():
        return None
    cxx = CROSS_COMPILERS.get(arch)
    if cxx is None:
        raise CrossCompileError(f"no cross compiler known for {arch} (TVM target {tvm_target.get('mtriple')})")
    if shutil.which(cxx) is None:
        raise CrossCompileError(f"cross compiler {cxx} not found: {INSTALL_HINT.get(arch, 'install it')}")
    from tvm.support import cc

    return cc.cross_compiler(cxx)


def export_aarch64(mod) -> str:
    """MetaSchedule builder export for aarch64 boards (runs in the builder's worker processes)."""
    import os
    import tempfile

    from tvm.support import cc

    path = os.path.join(tempfile.mkdtemp(prefix="dsnet-ms-"), "tvm_tmp_mod.so")
    mod.export_library(path, fcompile=cc.cross_compiler(CROSS_COMPILERS["aarch64"]))
    return path


def _host_llvm_cpu() -> str:
    try:
        import tvm

        return str(tvm.get_global_func("target.llvm_get_system_cpu")())
    except Exception:  # TVM missing: unavailable() reports that itself
        return "generic"


class TVMBackend(Backend):
    name = "tvm"
    devices = ("cpu", "cuda")
    precisions = ("fp32", "fp16")
    artifact = "model.so"
    OPTIONS = {"target": (dict, False), "tune_trials": (int, False), "host": (dict, False)}
    supports_remote = True

    def resolve_options(self, options):
        tvm_target = options.get("target")
        if tvm_target is not None and tvm_target.get("mcpu") == "auto":
            options["target"] = {**tvm_target, "mcpu": _host_llvm_cpu()}
        return options

    @property
    def tune_trials(self) -> int:
        return int(self.options.get("tune_trials", 0))

    def cache_key(self):
        return {"target": self.options.get("target"), "host": self.options.get("host"),
                "tune_trials": self.tune_trials}

    def details(self):
        return {"tune_trials": self.tune_trials}

    def notes(self, target):
        if target.device == "cpu" and not self.tune_trials:
            return ["tvm is untuned (tune_trials = 0 in the profile): untuned CPU convolutions are far slower "
                    "than tuned ones; set [tvm] tune_trials to tune"]
        return []

    def tvm_target(self, target) -> dict:
        """The TVM target dict for ``target`` (``num-cores = 0``: the profile's threads)."""
        t = dict(self.options.get("target") or {})
        if t.get("num-cores") == 0:
            t["num-cores"] = max(1, target.threads)
        return t

    @property
    def tuning_dir(self) -> Path | None:
        return self.workdir

    def unavailable(self, target):
        try:
            import tvm  # noqa: F401
            from tvm.relax.frontend.torch import from_exported_program  # noqa: F401
        except Exception as e:  # ImportError, or a broken tvm-ffi
            return f"apache-tvm is not importable ({type(e).__name__}: {e})"
        if not self.options.get("target"):
            return f"target profile '{target.name}' has no [tvm] target"
        if target.device == "cuda":
            import tvm

            if not tvm.cuda(0).exist:
                return "TVM was built without CUDA or sees no GPU (tvm.cuda(0).exist is False)"
        return None

    @staticmethod
    def _device(target):
        import tvm

        return tvm.cuda(0) if target.device == "cuda" else tvm.cpu(0)

    def _engine(self, lib, target, precision):
        import tvm
        from tvm import relax

        dev = self._device(target)
        vm = relax.VirtualMachine(lib, dev)
        main = vm["main"]

        to_dev = input_caster(target, precision)

        def prepare(x):  # zero-copy through DLPack
            return tvm.runtime.from_dlpack(to_dev(x).detach())

        def to_torch(out):
            return as_torch_outputs(out, lambda t: torch.from_dlpack(t).clone())

        sync = dev.sync if target.device == "cuda" else None
        return Engine(main, prepare=prepare, to_torch=to_torch, sync=sync)

    def tuning_record_count(self) -> int:
        """Tuning records in the shared database (0 when there is none)."""
        if self.tuning_dir is None or not (self.tuning_dir / "database_tuning_record.json").is_file():
            return 0
        with open(self.tuning_dir / "database_tuning_record.json") as f:
            return sum(1 for line in f if line.strip())

    def _tune(self, mod, tvm_target, trials: int) -> tuple[int, int]:
        """Tune the workloads of ``mod`` the shared database does not hold yet; returns (tuned, all).

        MetaSchedule lives in ``tvm.s_tir.meta_schedule`` in TVM 0.27. Its XGBoost cost model needs
        the ``xgboost`` package; without it the search uses the random cost model.
        """
        import importlib.util

        from tvm.s_tir import meta_schedule as ms
        from tvm.s_tir.meta_schedule.relax_integration import extracted_tasks_to_tune_contexts

        self.tuning_dir.mkdir(parents=True, exist_ok=True)
        database = ms.database.JSONDatabase(work_dir=str(self.tuning_dir))
        tasks = ms.relax_integration.extract_tasks(mod, tvm_target)
        todo = [t for t in tasks if not database.has_workload(t.dispatched[0])]
        if todo:
            contexts, weights = extracted_tasks_to_tune_contexts(todo, str(self.tuning_dir))
            builder, runner = "local", "local"
            if self.remote is not None:  # candidates built here (cross-compiled for a board), run there
                host, port, key = self.remote
                runner = ms.runner.RPCRunner(ms.runner.RPCConfig(host, port, key, session_timeout_sec=120))
                if target_arch(dict(tvm_target.export())) == "aarch64" != host_arch():
                    builder = ms.builder.LocalBuilder(f_export=export_aarch64)
            ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(self.tuning_dir),
                          max_trials_global=trials * len(contexts), max_trials_per_task=trials,
                          num_trials_per_iter=min(64, trials), database=database, builder=builder,
                          runner=runner, cost_model="xgb" if importlib.util.find_spec("xgboost") else "random")
        return len(todo), len(tasks)

    def check_export(self, target):
        cross_compiler(self.tvm_target(target))

    def export(self, module, example, target, precision, artifact_dir) -> Exported:
        """Build ``module`` for the profile's TVM target and write the shared library; for another
        architecture (an ARM board) with the cross compiler."""
        import tvm
        from tvm import relax
        from tvm.relax.frontend.torch import from_exported_program

        fcompile = cross_compiler(self.tvm_target(target))  # before the build: a missing compiler fails fast

        module, example = cast(module, example, target, precision, device="cpu")  # exported on CPU
        with torch.no_grad():
            program = torch.export.export(module, (example,))
        mod = from_exported_program(program, keep_params_as_input=False)
        tvm_target = tvm.target.Target(self.tvm_target(target))
        trials, details = self.tune_trials, {}
        if target.device == "cuda":
            from tvm import dlight as dl

            mod = relax.get_pipeline("zero")(mod)
            with tvm_target:
                mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                              dl.gpu.GeneralReduction(), dl.gpu.Fallback())(mod)
        elif trials > 0 and self.tuning_dir is not None:
            mod = relax.get_pipeline("zero")(mod)
            details["tuned_tasks"], details["tasks"] = self._tune(mod, tvm_target, trials)
            with tvm_target, tvm.transform.PassContext(opt_level=3):
                mod = relax.transform.MetaScheduleApplyDatabase(str(self.tuning_dir))(mod)
        lib = tvm.compile(mod, target=tvm_target)
        path = artifact_dir / self.artifact
        lib.export_library(str(path), fcompile=fcompile) if fcompile else lib.export_library(str(path))
        return Exported(path, details)

    def compile(self, module, example, target, precision, artifact_dir):
        import tvm

        arch = target_arch(self.tvm_target(target))
        if arch != host_arch():
            raise RuntimeError(f"built for {arch}, this machine is {host_arch()}: measure it on the board "
                               "(--rpc-tracker HOST:PORT --rpc-key KEY)")
        exported = self.export(module, example, target, precision, artifact_dir)
        engine = self._engine(tvm.runtime.load_module(str(exported.path)), target, precision)
        engine.details.update(exported.details)
        return engine

    def load(self, artifact_dir, example, target, precision):
        import tvm

        return self._engine(tvm.runtime.load_module(str(artifact_dir / self.artifact)), target, precision)
