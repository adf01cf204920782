"""``tvm``: ``torch.export`` -> Relax (``from_exported_program``) -> build for the profile's target.

Options (the profile's ``[tvm]`` table, checked here): ``target``, a TVM 0.27 target dict, e.g.
``{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "auto", "num-cores": 0}`` (``auto``: the
host CPU as LLVM names it; ``0`` cores: the profile's thread count); ``tune_minutes``, the tuning
budget ``harness.run`` spends before measuring (``harness.tune`` takes its own; 0: tune nothing);
``host``, the host target of a GPU build; ``layout`` (``NCHW``, the default, or ``NHWC``: every
convolution converted, channels innermost) and ``weight_prepack`` (CPU: weights marked
layout-free, so a tuned schedule may choose their layout; the rewrite is folded into the constants
at build time, TVM's ``cpu_weight_prepack`` with an unchanged signature). Both change the tuning
tasks: records tuned under one setting do not serve the other (the labels say so). ``fast_math``
(default false): ``exp``, ``tanh``, ``erf``, ``softmax`` (as TVM's ``FastMathTransform``) and
``sigmoid`` (SiLU's gate, as ``1 / (1 + fast_exp(-x))``) by TOPI's vectorizable polynomial
approximations (exactly, LLVM lowers each ``exp`` of a vector to one libm call per element); the
build is checked against eager like any other.

Batch norm is folded into the convolution before it (``FoldBatchnormToConv2D``), as ONNX Runtime
and TorchScript do; the arithmetic that leaves on the weights, the weights' transposes and their
prepacked layouts are folded by :func:`harness.backends.tvm_relax.fold_constants` (NumPy, one
library for the layouts) rather than one LLVM build per constant. CPU builds apply whatever the
MetaSchedule database in the backend's ``workdir`` (``<results>/tvm_tuning/``, filled by
:mod:`harness.backends.tvm_tuning`) holds for their functions; functions it lacks keep TVM's
default (unscheduled) lowering. A database tuned for another TVM target is not applied (said in
``notes``). Each engine's ``details`` label it ``untuned``, ``partly tuned (k/n)`` or ``tuned``
with the trials spent; the artifact's cache key carries the database's digest, so new records
rebuild the artifacts. CUDA builds apply DLight's default GPU schedules. ``export`` writes the
library only, cross-compiled when the target is another architecture (``harness.measure.remote``
runs it on a board); :func:`cross_compiler` finds the cross compiler or says what to install.
:meth:`TVMBackend.search_builder_runner` is how candidates are built and run while tuning (on a
board through the RPC tracker when remote).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import platform
import shutil
from pathlib import Path

import numpy as np
import torch

from harness.backends import tvm_relax
from harness.backends.base import (
    Backend,
    DeviceTarget,
    Engine,
    Exported,
    as_torch_outputs,
    cast,
    input_caster,
    native_choice,
    one_line,
)
from harness.backends.tvm_tuning import (
    ABOUT,
    RECORD_FILES,
    SHIPPED_FILES,
    ShippedRecords,
    TuningDatabase,
    apply_records,
    files_stamp,
    module_status,
)

TUNING_RECORDS = RECORD_FILES[1]  # the file that changes when records do
TVM_ALIGNMENT = 64  # bytes: tvm.runtime.from_dlpack refuses data less aligned than this
ARCH_OF_TRIPLE = {"aarch64": "aarch64", "arm64": "aarch64", "x86_64": "x86_64"}
CROSS_COMPILERS = {"aarch64": "aarch64-linux-gnu-g++"}
INSTALL_HINT = {"aarch64": "install Debian's g++-aarch64-linux-gnu (apt-get install g++-aarch64-linux-gnu)"}


class CrossCompileError(RuntimeError):
    """No way to build for the target's architecture here (one line with what to install)."""


_LOADS = itertools.count()


def _load_library(path: Path):
    """``tvm.runtime.load_module`` through a private copy of its own, removed once loaded: the dynamic
    loader hands back a library it already loaded under the same path (a library rebuilt at that path
    in this process would otherwise be the old one), and a library mapped from the cache's own file
    (or a hard link to it) dies with SIGBUS when that file is later rewritten in place."""
    import tvm

    path = Path(path)
    alias = path.with_name(f".{path.stem}-{os.getpid()}-{next(_LOADS)}{path.suffix}")
    shutil.copyfile(path, alias)
    try:
        return tvm.runtime.load_module(str(alias))
    finally:
        alias.unlink(missing_ok=True)


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
    # fp32 only: the Relax torch frontend rejects a half module's batch norm (TVM 0.27:
    # NormCheckDtypeAndShape sees fp32 data beside fp16 gamma), seen on CPU and on an H100
    precisions = ("fp32",)
    artifact = "model.so"
    one_artifact = True
    tuned_per_shape = True  # on a CPU: MetaSchedule's records (on a GPU, DLight schedules any shape)
    build_apart = True  # what an LLVM build leaves in the process slows later rounds (Backend.build_apart)
    OPTIONS = {"target": (dict, False), "tune_minutes": ((int, float), False), "host": (dict, False),
               "layout": (str, False), "weight_prepack": (bool, False), "fast_math": (bool, False),
               "shipped_records": (str, False)}
    PATH_OPTIONS = ("shipped_records",)
    LAYOUTS = ("NCHW", "NHWC")
    supports_remote = True

    def resolve_options(self, options):
        tvm_target = options.get("target")
        if tvm_target is not None and tvm_target.get("mcpu") == "auto":
            options["target"] = {**tvm_target, "mcpu": _host_llvm_cpu()}
        if options.get("tune_minutes", 0) < 0:
            raise ValueError(f"[tvm] tune_minutes must be >= 0, got {options['tune_minutes']}")
        if options.get("layout", "NCHW") not in self.LAYOUTS:
            raise ValueError(f"[tvm] layout must be one of {', '.join(self.LAYOUTS)}, got {options['layout']!r}")
        return options

    @property
    def layout(self) -> str:
        return self.options.get("layout", "NCHW")

    @property
    def weight_prepack(self) -> bool:
        return bool(self.options.get("weight_prepack", False))

    @property
    def fast_math(self) -> bool:
        return bool(self.options.get("fast_math", False))

    @property
    def tune_minutes(self) -> float:
        return float(self.options.get("tune_minutes", 0))

    def database_digest(self) -> str:
        """A digest of the tuning records (empty without a database): part of the cache key."""
        return self._digest(self.workdir / TUNING_RECORDS if self.workdir is not None else None)

    def _digest(self, records: Path | None) -> str:
        """A digest of one records file (empty when there is none), computed again only when the file changes."""
        if records is None or not records.is_file():
            return ""
        stat = records.stat()
        memo = self.__dict__.setdefault("_digests", {})
        if memo.get(records, (None,))[0] != (stat.st_mtime_ns, stat.st_size):
            memo[records] = ((stat.st_mtime_ns, stat.st_size), hashlib.sha1(records.read_bytes()).hexdigest()[:16])
        return memo[records][1]

    def cache_key(self):
        key = {"target": self.options.get("target"), "host": self.options.get("host"),
               "layout": self.layout, "weight_prepack": self.weight_prepack, "fast_math": self.fast_math,
               "tuning_records": self.database_digest(), "branch_weights": "bound"}
        if self.options.get("shipped_records"):  # the records a build may apply besides the local ones
            folder = Path(self.options["shipped_records"])
            key["shipped_records"] = [self._digest(folder / SHIPPED_FILES[1]), self._digest(folder / ABOUT)]
        return key

    def details(self):
        return {"tune_minutes": self.tune_minutes}

    def notes(self, target: DeviceTarget):
        if target.device != "cpu":
            return []
        try:
            db = self.database(target)
        except ValueError as e:  # an unreadable database: every TVM build will say so too
            return [f"tvm: {e}"]
        shipped = self.shipped(target)
        refused = self.shipped_refusal()  # after shipped(): records that do not unpack are refused there
        notes = [f"tvm: {refused}"] if refused else []
        if db is None and shipped is None:
            return notes + [f"tvm is untuned (no tuning database in {self.workdir}): untuned CPU convolutions are far "
                            f"slower than tuned ones; run python -m harness.tune --target {target.name}"]
        why = db.foreign() if db is not None else None
        if why:
            notes.append(f"{why}: not applied" + (", tvm is untuned" if shipped is None else ""))
        if shipped is not None and (db is None or why):
            records = self._shipped_records()[0]  # named by their folder, not by where they were unpacked
            notes.append(f"tvm builds with the shipped records in {records.directory} (tuned for "
                         f"{records.about.get('target', '?')}); python -m harness.tune --target {target.name} "
                         "tunes further for this CPU")
        return notes

    def tvm_target(self, target: DeviceTarget) -> dict:
        """The TVM target dict for ``target`` (``num-cores = 0``: the profile's threads)."""
        t = dict(self.options.get("target") or {})
        if t.get("num-cores") == 0:
            t["num-cores"] = max(1, target.threads)
        return t

    @property
    def tuning_dir(self) -> Path | None:
        return self.workdir

    def database(self, target: DeviceTarget):
        """What builds apply for ``target``: the best record per workload of the workdir's tuning
        database (:meth:`TuningDatabase.best_of`; None when nothing was tuned there), read once per
        change of the workdir's files rather than once per build."""
        import tvm

        tvm_target = tvm.target.Target(self.tvm_target(target))
        stamp = (str(tvm_target), files_stamp(self.tuning_dir))
        if getattr(self, "_database_of", None) != stamp:
            self._database = TuningDatabase.best_of(self.tuning_dir, tvm_target)
            self._database_of = stamp
        return self._database

    def shipped(self, target: DeviceTarget) -> TuningDatabase | None:
        """The profile's shipped records (``[tvm] shipped_records``) as builds read them, None when
        the profile names none or they are refused here (:meth:`shipped_refusal` says why)."""
        records, why = self._shipped_records()
        if records is None or why:
            return None
        import tvm

        tvm_target = tvm.target.Target(self.tvm_target(target))
        if getattr(self, "_shipped_of", None) != str(tvm_target):
            try:
                self._shipped, self._shipped_of = records.database(tvm_target), str(tvm_target)
            except ValueError as e:  # a damaged file: refused like records that do not apply
                self._shipped_memo = None, f"{e}: not applied"
                return None
        return self._shipped

    def shipped_vouch(self, task_signature: str) -> dict | None:
        """What the applicable shipped records vouch for the tasks of ``task_signature``
        (:meth:`~harness.backends.tvm_tuning.ShippedRecords.vouched`), None when they do not."""
        records, why = self._shipped_records()
        return None if records is None or why else records.vouched(task_signature)

    def shipped_records(self) -> ShippedRecords | None:
        """The profile's shipped records folder as read (None when it names none or it is unreadable)."""
        return self._shipped_records()[0]

    def shipped_refusal(self) -> str | None:
        """Why the profile's shipped records are not applied here (one line), None when they are
        or the profile names none."""
        return self._shipped_records()[1]

    def _shipped_records(self) -> tuple[ShippedRecords | None, str | None]:
        """The shipped records and why they are refused, read once (every build and note asks)."""
        if "_shipped_memo" not in self.__dict__:
            folder = self.options.get("shipped_records")
            if not folder:
                self._shipped_memo = None, None
            else:
                try:
                    records = ShippedRecords(Path(folder))
                    self._shipped_memo = records, records.refusal()
                except ValueError as e:
                    self._shipped_memo = None, f"{e}: not applied"
        return self._shipped_memo

    def open_database(self, target: DeviceTarget):
        """The workdir's whole tuning database for ``target`` (every record: what tuning extends),
        created when missing; its records are read on first use."""
        import tvm

        return TuningDatabase(self.tuning_dir, tvm.target.Target(self.tvm_target(target)))

    def search_builder_runner(self, search):
        """How tuning builds and runs candidates: ``(None, None)`` (local, the defaults of
        :mod:`harness.backends.tvm_tuning`), or through the RPC tracker on a board."""
        if self.remote is None:
            return None, None
        from tvm.s_tir import meta_schedule as ms

        host, port, key = self.remote
        runner = ms.runner.RPCRunner(ms.runner.RPCConfig(host, port, key, session_timeout_sec=120),
                                     evaluator_config=search.evaluator())
        builder = None
        arch = target_arch(self.options.get("target") or {})
        if arch == "aarch64" != host_arch():  # candidates cross-compiled here, run on the board
            builder = ms.builder.LocalBuilder(f_export=export_aarch64, timeout_sec=search.timeout_s)
        return builder, runner

    def relax_module(self, module, example, target: DeviceTarget, precision):
        """``module`` as a Relax module after the zero pipeline (what tuning extracts tasks from
        and the database applies to), and the TVM target."""
        import tvm
        from tvm import relax
        from tvm.relax.frontend.torch import from_exported_program

        module, example = cast(module, example, target, precision, device="cpu")  # exported on CPU
        with torch.no_grad():
            program = torch.export.export(module, (example,))
        mod = from_exported_program(program, keep_params_as_input=False)
        # a one-graph network's branches as the passes below see a static network: without it each
        # branch ran unfused, its batch norm and layout rewrites computed per call, and no tuning
        # record applied to it
        mod = tvm_relax.inline_branch_weights(mod)
        # batch norm folded into the convolution before it, as ONNX Runtime and TorchScript's
        # optimize_for_inference do: one fused task (conv + bias + activation) per layer instead of
        # a convolution task and a batch-norm task, half the tasks to tune and one pass over memory
        mod = tvm_relax.fold_constants(relax.transform.FoldBatchnormToConv2D()(mod))
        if self.layout == "NHWC":  # channels innermost: vector loops over channels; weights transposed once
            mod = tvm_relax.fold_constants(relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OHWI"]})(mod))
        if self.fast_math:
            mod = tvm_relax.fast_math(mod)
        mod = relax.get_pipeline("zero")(relax.transform.CanonicalizeBindings()(mod))
        if self.weight_prepack and target.device == "cpu":
            # weights (constants here) marked layout-free: MetaSchedule's RewriteLayout may then
            # choose their layout for the schedule it tunes; export folds that rewrite into the
            # constants (TVM's cpu_weight_prepack, without changing the deployed signature)
            mod = relax.transform.AttachAttrLayoutFreeBuffers()(mod)
        return mod, tvm.target.Target(self.tvm_target(target))

    def unavailable(self, target: DeviceTarget):
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
    def _device(target: DeviceTarget):
        import tvm

        return tvm.cuda(0) if target.device == "cuda" else tvm.cpu(0)

    def _engine(self, lib, target: DeviceTarget, precision):
        import tvm
        from tvm import relax

        dev = self._device(target)
        vm = relax.VirtualMachine(lib, dev)
        main = vm["main"]

        to_dev = input_caster(target, precision)

        def prepare(x):  # zero-copy through DLPack, unless the data is not where TVM can take it
            x = to_dev(x).detach()
            if not x.is_contiguous() or x.data_ptr() % TVM_ALIGNMENT:  # e.g. an array NumPy loaded
                x = x.clone(memory_format=torch.contiguous_format)  # torch allocates 64-byte aligned
            return tvm.runtime.from_dlpack(x)

        def to_torch(out):
            return as_torch_outputs(out, lambda t: torch.from_dlpack(t).clone())

        sync = dev.sync if target.device == "cuda" else None
        # the gate's scores on the host: on a CPU a zero-copy view (.numpy() cost ~100 us more in a
        # chain of calls, 1-10 us alone: ~95 of TVM's 207 us per decision, DS-MBNet head at 224)
        host = (lambda t: t.numpy()) if target.device == "cuda" else np.from_dlpack
        return Engine(main, prepare=prepare, to_torch=to_torch, sync=sync,
                      outputs=lambda out: (out,) if hasattr(out, "numpy") else tuple(out),
                      choice=lambda scores: native_choice(host(scores)))

    def check_export(self, target: DeviceTarget):
        cross_compiler(self.tvm_target(target))

    def scheduled(self, mod, tvm_target, target: DeviceTarget) -> tuple:
        """``(mod, details)``: ``mod`` (from :meth:`relax_module`) with its schedules (DLight's default
        GPU rules on CUDA; on a CPU the tuning database's records, each prepacked weight's layout
        rewrite folded into the constant) and the tuning label of :func:`module_status`."""
        from tvm import relax

        if target.device == "cuda":
            from tvm.s_tir import dlight as dl  # TVM 0.27: DLight lives under s_tir

            with tvm_target:
                return dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                               dl.gpu.GeneralReduction(), dl.gpu.Fallback())(mod), {}
        db, shipped = self.database(target), self.shipped(target)
        status = module_status(db, mod, tvm_target, shipped)
        details = status.details()
        if not status.tuned:
            return mod, details
        try:
            local = [] if db is None or db.foreign() else [db]
            applied = apply_records(mod, tvm_target, local + ([shipped] if shipped is not None else []))
            if self.weight_prepack:  # the rewrite runs once, here, instead of in every call
                applied = tvm_relax.fold_constants(relax.transform.SplitLayoutRewritePreproc()(applied))
            return applied, details
        except RuntimeError as e:  # tvm.error.InternalError: a record's trace did not replay
            # anchor-block equality lends a record to every function with the same anchor
            # block; replaying it on another fusion can fail (seen on the one artifact's
            # branches): build untuned and say why, rather than lose the row
            return mod, {**details, "tuning": "untuned", "tuned_tasks": 0,
                         "tuning_error": f"the database's records did not apply: {one_line(e)}"}

    def export(self, module, example, target: DeviceTarget, precision, artifact_dir) -> Exported:
        """Build ``module`` for the profile's TVM target (:meth:`scheduled`) and write the shared
        library; for another architecture with the cross compiler."""
        import tvm

        fcompile = cross_compiler(self.tvm_target(target))  # before the build: a missing compiler fails fast
        mod, tvm_target = self.relax_module(module, example, target, precision)
        mod, details = self.scheduled(mod, tvm_target, target)
        lib = tvm.compile(mod, target=tvm_target)
        path = artifact_dir / self.artifact
        lib.export_library(str(path), fcompile=fcompile) if fcompile else lib.export_library(str(path))
        return Exported(path, details)

    def compile(self, module, example, target: DeviceTarget, precision, artifact_dir):
        arch = target_arch(self.tvm_target(target))
        if arch != host_arch():
            raise RuntimeError(f"built for {arch}, this machine is {host_arch()}: measure it on the board "
                               "(--rpc-tracker HOST:PORT --rpc-key KEY)")
        exported = self.export(module, example, target, precision, artifact_dir)
        engine = self._engine(_load_library(exported.path), target, precision)
        engine.details.update(exported.details)
        return engine

    def load(self, artifact_dir, example, target: DeviceTarget, precision):
        return self._engine(_load_library(artifact_dir / self.artifact), target, precision)
