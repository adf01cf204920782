"""``tvm``: ``torch.export`` -> Relax (``from_exported_program``) -> build for the profile's target.

The target is a dict (TVM 0.27), e.g. ``{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu":
"znver4", "num-cores": 2}``. CPU builds are untuned unless the profile sets ``tune_trials``: then
MetaSchedule tunes with a database in ``<results>/<target>/tvm_tuning/``, shared by every route, and
only workloads the database does not hold yet are tuned, so each distinct layer is tuned once and a
re-run tunes nothing. CUDA builds apply DLight's default GPU schedules. ``export`` builds and writes the library only,
cross-compiled when the target is another architecture (``harness.remote`` runs it on a board).
"""

from __future__ import annotations

from pathlib import Path

import torch

from harness.backends.base import Backend, Engine, as_torch_outputs, cast, input_caster


class TVMBackend(Backend):
    name = "tvm"
    devices = ("cpu", "cuda")
    precisions = ("fp32", "fp16")
    artifact = "model.so"

    def __init__(self, tuning_dir: Path | None = None, rpc: tuple[str, int, str] | None = None):
        self.tuning_dir = tuning_dir  # set by the harness to <results>/<target>/tvm_tuning
        self.rpc = rpc  # (tracker host, port, key): tuning measures candidates on the boards
        self.last_tuned_tasks = 0  # workloads tuned by the last compile (0: all were in the database)
        self.last_task_count = 0  # workloads the last tuned compile had in all

    def unavailable(self, target):
        try:
            import tvm  # noqa: F401
            from tvm.relax.frontend.torch import from_exported_program  # noqa: F401
        except Exception as e:  # ImportError, or a broken tvm-ffi
            return f"apache-tvm is not importable ({type(e).__name__}: {e})"
        if not target.tvm.get("target"):
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

    def _tune(self, mod, tvm_target, trials: int) -> int:
        """Tune the workloads of ``mod`` the shared database does not hold yet; returns how many.

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
        self.last_task_count = len(tasks)
        if todo:
            contexts, weights = extracted_tasks_to_tune_contexts(todo, str(self.tuning_dir))
            builder, runner = "local", "local"
            if self.rpc is not None:  # candidates built here (cross-compiled for a board), run there
                from harness.remote import export_aarch64, host_arch, target_arch

                host, port, key = self.rpc
                runner = ms.runner.RPCRunner(ms.runner.RPCConfig(host, port, key, session_timeout_sec=120))
                if target_arch(dict(tvm_target.export())) == "aarch64" != host_arch():
                    builder = ms.builder.LocalBuilder(f_export=export_aarch64)
            ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(self.tuning_dir),
                          max_trials_global=trials * len(contexts), max_trials_per_task=trials,
                          num_trials_per_iter=min(64, trials), database=database, builder=builder,
                          runner=runner, cost_model="xgb" if importlib.util.find_spec("xgboost") else "random")
        return len(todo)

    def export(self, module, example, target, precision, artifact_dir) -> Path:
        """Build ``module`` for the profile's TVM target and write the shared library; for another
        architecture (an ARM board) with the cross compiler. Returns the library's path."""
        import tvm
        from tvm import relax
        from tvm.relax.frontend.torch import from_exported_program

        from harness.remote import cross_compiler

        fcompile = cross_compiler(target.tvm["target"])  # before the build: a missing compiler fails fast

        module, example = cast(module, example, target, precision, device="cpu")  # exported on CPU
        with torch.no_grad():
            program = torch.export.export(module, (example,))
        mod = from_exported_program(program, keep_params_as_input=False)
        tvm_target = tvm.target.Target(target.tvm["target"])
        trials = int(target.tvm.get("tune_trials", 0))
        if target.device == "cuda":
            from tvm import dlight as dl

            mod = relax.get_pipeline("zero")(mod)
            with tvm_target:
                mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                              dl.gpu.GeneralReduction(), dl.gpu.Fallback())(mod)
        elif trials > 0 and self.tuning_dir is not None:
            mod = relax.get_pipeline("zero")(mod)
            self.last_tuned_tasks = self._tune(mod, tvm_target, trials)
            with tvm_target, tvm.transform.PassContext(opt_level=3):
                mod = relax.transform.MetaScheduleApplyDatabase(str(self.tuning_dir))(mod)
        lib = tvm.compile(mod, target=tvm_target)
        path = artifact_dir / self.artifact
        lib.export_library(str(path), fcompile=fcompile) if fcompile else lib.export_library(str(path))
        return path

    def compile(self, module, example, target, precision, artifact_dir):
        import tvm

        from harness.remote import host_arch, target_arch

        arch = target_arch(target.tvm["target"])
        if arch != host_arch():
            raise RuntimeError(f"built for {arch}, this machine is {host_arch()}: measure it on the board "
                               "(--rpc-tracker HOST:PORT --rpc-key KEY)")
        path = self.export(module, example, target, precision, artifact_dir)
        return self._engine(tvm.runtime.load_module(str(path)), target, precision)

    def load(self, artifact_dir, example, target, precision):
        import tvm

        return self._engine(tvm.runtime.load_module(str(artifact_dir / self.artifact)), target, precision)
