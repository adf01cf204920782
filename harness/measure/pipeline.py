"""The one compile -> check -> time pipeline; every phase of a run goes through it.

Contract
--------
Results are values, never exceptions (TVM's ``RunnerResult`` style): a :class:`Result` has a
``status`` (:data:`~harness.results.layout.STATUSES`), a one-line ``error``, the compile (or
artifact-load) time ``compile_s``, the backend's ``details`` that change a number, and, when
``ok``, the checked ``engine`` and, once timed, its ``measurement``.

- :class:`ArtifactKey` is the one key of a compiled artifact: model, route (or part), backend and
  its artifact options, target and its threads, precision, input shape, library versions and the
  weights' fingerprint. Two tasks share an artifact only when all of these agree.
- :func:`trial` loads the cached artifact or compiles it, runs it on the check input and
  compares it with eager fp32 (:func:`check_output`). A cached artifact is loaded only when this
  installation signed it (:mod:`harness.measure.signing`: a copied or planted library is never
  loaded, it is rebuilt); one that is unsigned, fails to load or fails the check is rebuilt once
  into fresh files (the ``rebuilt`` detail says why); an engine still wrong is ``check_failed`` and
  its artifact is deleted, so a retry recompiles. Before any engine is trusted, eager's own output must depend on
  its input (:func:`insensitive`): a module whose activations vanish would let any engine pass.
  Nothing is timed here.
- Timing is the phases' (``harness.phases``): they time their ``ok`` results together through one
  :class:`harness.measure.rounds.RoundPhase` and store ``result.row()``.
  :func:`timed_call` is what they time: the engine's ``run`` on its prepared input or, when the
  profile asks for CUDA graphs, the replay of a captured call, checked against the plain call first;
  the result's ``cuda_graph`` detail says which was timed and why.
- :func:`check_input` (and :func:`image_batch`) is the one seeded input engines are checked and
  timed on; :func:`check_input_like` the same with the channel statistics of a segment's real input.
- :func:`exported` builds the artifact only, for a board (``harness.measure.remote`` checks and
  times it there); :func:`built` compiles it without checking it, in a build worker
  (:mod:`harness.measure.build_worker`), and ``trial(..., built=that result)`` then loads and checks
  it as a fresh build (its compile time, not cached).

The module given is never modified (backends work on copies) and must be in eval mode.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness import interrupts
from harness.backends.base import capture_cuda_graph, one_line
from harness.env import library_versions
from harness.measure.protocol import Measurement
from harness.measure.signing import sign, untrusted_files

# (rtol, atol) against eager fp32. fp32: per element, |out - eager| <= atol + rtol * |eager|. fp16:
# against the output's scale, |out - eager| <= atol + rtol * max|eager|: a 10-bit mantissa's error
# accumulates over depth (measured: DS-MBNet's largest route at 224, logits up to 40, is 0.3 off in
# eager fp16 on a CPU and 0.5 in TorchScript fp16 on an H100, where BN folded into half weights),
# while a wrong engine (a wrong slice, a wrong statistic) is off by the scale itself.
TOLERANCE = {"fp32": (1e-3, 1e-4), "fp16": (3e-2, 2e-2)}
# fp32 also allows this fraction of max|eager| on every element: an element near zero among large
# ones carries the rounding of the large sums (measured: a DS-MBNet segment's logits up to 86 on
# seeded features, TorchScript's folded convs 2.5e-4 off on a near-zero logit: 3e-6 of the scale;
# DS-MBNet++'s wide segments at 224 px under the reference weights, outputs up to 8128 on inputs
# like their own, TorchScript 0.9e-6..4.3e-5 of the scale, growing with it). A wrong slice, statistic
# or route is off by the scale itself: 1e-4 of it still tells them apart by four orders of magnitude.
FP32_SCALE_RTOL = 1e-4


@dataclass(frozen=True)
class Result:
    status: str
    error: str = ""
    compile_s: float | None = None
    details: dict = field(default_factory=dict)
    engine: object = field(default=None, repr=False, compare=False)
    measurement: Measurement | None = field(default=None, repr=False)
    artifact: Path | None = None  # set by :func:`exported`

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def replace(self, **changes) -> Result:
        return dataclasses.replace(self, **changes)

    def row(self) -> dict:
        """The columns every stored result has: status, error, compile time, backend details and,
        once timed, the statistics and raw samples."""
        row = {"status": self.status, "error": self.error, "compile_s": self.compile_s,
               "backend_details": json.dumps(self.details, sort_keys=True)}
        if self.measurement is not None:
            row.update(stats_row(self.measurement))
        return row


def stats_row(m) -> dict:
    """The stored columns of a :class:`~harness.measure.protocol.Measurement`: statistics, the
    median's interval, validity, raw samples and their rounds."""
    s = m.stats
    return {"latency_ms_p50": s.p50, "latency_ms_p90": s.p90, "latency_ms_mean": s.mean, "latency_ms_std": s.std,
            "n": s.n, "latency_ms_p50_ci_low": s.ci_low, "latency_ms_p50_ci_high": s.ci_high, "valid": int(s.valid),
            "number": m.number, "samples_ms": m.samples_ms, "rounds": m.rounds,
            "sample_order": m.order}


@dataclass(frozen=True)
class ArtifactKey:
    model: str
    route: str  # a route label, or a part's name (a segment, a Table 2 way)
    backend: str
    precision: str
    shape: tuple[int, ...]
    weights: str  # :func:`weights_fingerprint` of the module
    target: str
    threads: int
    backend_key: str  # the backend's cache_key(), as JSON
    versions: str  # library versions, as JSON

    @classmethod
    def of(cls, model: str, route: str, backend, target, precision: str, example: torch.Tensor,
           weights: str) -> ArtifactKey:
        return cls(model, str(route), backend.base_name, precision, tuple(example.shape), weights, target.name,
                   int(target.threads), json.dumps(backend.cache_key(), sort_keys=True),
                   json.dumps(library_versions(), sort_keys=True))

    def directory(self, cache_root: Path) -> Path:
        digest = hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:12]
        shape = "x".join(map(str, self.shape))
        return Path(cache_root) / self.backend / f"{self.model}-{self.route}-{self.precision}-{shape}-{digest}"


CHECK_SEED = 1


def check_input(shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The one seeded input every engine is checked and timed on: standard normal values of
    ``shape`` (an image batch ``(n, 3, h, w)``, or the features a segment of the dynamic engine takes),
    the same in every run, so cached artifacts and their checks agree."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(CHECK_SEED), dtype=dtype)


def check_input_like(shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """:func:`check_input` of ``shape`` given the per-channel mean and standard deviation of
    ``like`` (features a segment really takes: channels on dim 1 of an image-like tensor, else on
    the last dim). A deep segment fed standard normal values where its trained input is, say,
    non-negative and small can blow its activations up a thousandfold (measured: a DS-ResNet++
    segment at 224 px, output scale 5302 on standard normal input, 6.4 on inputs like its own), and
    fp32 rounding at that scale fails an engine that is right."""
    like = like.detach().float()
    dims = (0, 2, 3) if like.dim() == 4 else tuple(range(like.dim() - 1))
    mean, std = like.mean(dim=dims, keepdim=True), like.std(dim=dims, keepdim=True)
    base = check_input(shape)
    return (base * std.nan_to_num(0.0) + mean).to(dtype or like.dtype)


def image_batch(batch_size: int, input_size: int) -> torch.Tensor:
    """:func:`check_input` for ``batch_size`` RGB images of ``input_size`` x ``input_size``."""
    return check_input((batch_size, 3, input_size, input_size))


def weights_fingerprint(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def check_output(out, ref, precision: str) -> str | None:
    """None if ``out`` matches ``ref`` within the precision's tolerance, else why (one line).

    Both may be tuples of tensors (a module with several outputs): each is compared."""
    if isinstance(ref, tuple) or isinstance(out, tuple):
        if not (isinstance(ref, tuple) and isinstance(out, tuple) and len(ref) == len(out)):
            return "number of outputs differs from eager"
        for i, (o, r) in enumerate(zip(out, ref)):
            problem = check_output(o, r, precision)
            if problem:
                return f"output {i}: {problem}"
        return None
    out, ref = out.detach().float().cpu(), ref.detach().float().cpu()
    if out.shape != ref.shape:
        return f"output shape {tuple(out.shape)} differs from eager {tuple(ref.shape)}"
    if not torch.isfinite(out).all():
        return "output has non-finite values"
    rtol, atol = TOLERANCE[precision]
    diff = (out - ref).abs()
    if precision == "fp16":
        bound, what = atol + rtol * ref.abs().max(), f"{atol:g} + {rtol:g}*max|eager|"
    else:
        bound = atol + rtol * ref.abs() + FP32_SCALE_RTOL * ref.abs().max()
        what = f"{atol:g} + {rtol:g}*|eager| + {FP32_SCALE_RTOL:g}*max|eager|"
    if (diff > bound).any():
        return f"output differs from eager: max abs diff {diff.max().item():.3g} (tolerance {what}, {precision})"
    return None


def reference(module: torch.nn.Module, example: torch.Tensor):
    """Eager fp32 on the CPU: what every engine is checked against."""
    if module.training:
        raise ValueError("the pipeline takes eval-mode modules (BN statistics would change)")
    with torch.no_grad():
        return module(example.float().cpu())


SENSITIVITY = 1e-4  # smallest relative change of the output between two inputs that makes a check meaningful


def _flat(out) -> torch.Tensor:
    outs = out if isinstance(out, tuple) else (out,)
    return torch.cat([o.detach().float().cpu().flatten() for o in outs])


def insensitive(module: torch.nn.Module, example: torch.Tensor, ref) -> str | None:
    """Why eager's output cannot tell engines apart (it does not change with the input), or None."""
    g = torch.Generator().manual_seed(2)
    x = example.float().cpu()
    other = torch.randn(x.shape, generator=g) * (x.std() if x.numel() > 1 else 1.0) + x.mean()
    with torch.no_grad():
        a, b = _flat(ref), _flat(module(other))
    change = float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))
    if change < SENSITIVITY:
        return (f"eager's output hardly depends on the input (relative change {change:.2g} between two inputs): "
                "activations vanish, so the check could not tell a wrong engine apart; give the model "
                "reference statistics (dsnet.reference_statistics)")
    return None


def _compile(backend, module, example, target, precision, artifact_dir: Path, use_cache: bool):
    """``(engine, compile_s, cached, rebuilt)``; raises what the backend raises. A cached artifact
    is loaded only when this installation signed it (:mod:`harness.measure.signing`) and it loads;
    otherwise it is rebuilt into fresh files and ``rebuilt`` says why. ``use_cache=False``: rebuilt
    into fresh files whatever is there. Every build is signed."""
    t0 = time.perf_counter()
    rebuilt = None
    if use_cache and backend.has_artifact(artifact_dir):
        why = untrusted_files(backend.artifact_files(artifact_dir))
        if why is None:
            try:
                engine = backend.load(artifact_dir, example, target, precision)
                engine.details.update(_build_details(artifact_dir))
                return engine, time.perf_counter() - t0, True, None
            except Exception as e:  # a stale or broken cache entry: rebuilt, and said so
                why = f"it failed to load ({one_line(e)})"
        rebuilt = f"the cached artifact was not loaded: {why}"
        use_cache = False
    if not use_cache:  # fresh files: a library rebuilt at the same path must not be the one already loaded
        shutil.rmtree(artifact_dir, ignore_errors=True)
    artifact_dir.mkdir(parents=True, exist_ok=True)
    if backend.artifact:
        ensure_space(module, artifact_dir)
    t0 = time.perf_counter()
    engine = backend.compile(module, example, target, precision, artifact_dir)
    _signed(backend, artifact_dir)
    _keep_build_details(artifact_dir, engine.details)
    return engine, time.perf_counter() - t0, False, rebuilt


class OutOfSpace(OSError):
    """Too little free space to write an artifact: it stops the run (one line, what was stored is
    kept) rather than fail every remaining cell, and before a library's writer aborts the process
    (PyTorch's archive writer terminates it on a full disk)."""


MIN_FREE_BYTES = 64 << 20


def ensure_space(module: torch.nn.Module, directory: Path) -> None:
    """Raise :class:`OutOfSpace` when ``directory``'s file system has less free space than an artifact
    of ``module`` may take (three times its weights, at least :data:`MIN_FREE_BYTES`)."""
    weights = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    need = max(MIN_FREE_BYTES, 3 * weights)
    free = shutil.disk_usage(directory).free
    if free < need:
        raise OutOfSpace(errno.ENOSPC, f"no space left for an artifact ({free >> 10} KiB free, about "
                                       f"{need >> 20} MiB needed)", str(directory))


def _signed(backend, artifact_dir: Path) -> None:
    """Sign every file of the artifact a build wrote (backends without one write nothing to sign)."""
    for f in backend.artifact_files(artifact_dir):
        if f.is_file():
            sign(f)


BUILD_DETAILS = "build_details.json"  # what the build said of itself (e.g. TVM's tuning label), kept with the artifact


def _keep_build_details(artifact_dir: Path, details: dict) -> None:
    (artifact_dir / BUILD_DETAILS).write_text(json.dumps(details, sort_keys=True))


def _build_details(artifact_dir: Path) -> dict:
    try:
        details = json.loads((artifact_dir / BUILD_DETAILS).read_text())
        return details if isinstance(details, dict) else {}
    except (OSError, ValueError):
        return {}


def trial(backend, module: torch.nn.Module, example: torch.Tensor, target, precision: str, key: ArtifactKey,
          cache_root: Path, ref=None, built: Result | None = None) -> Result:
    """Compile (or load) and check one engine; see the module docstring. ``ref``: eager fp32's
    output on ``example`` when the caller has it (else computed here). ``built``: what :func:`built`
    returned for this key in a build worker: a failed build is the result; a fresh artifact is
    loaded and counts as compiled here (the worker's compile time plus the load, not cached)."""
    if built is not None and not built.ok:
        if built.details.get("out_of_space"):  # the worker found the disk full: so is this process's
            raise OutOfSpace(errno.ENOSPC, built.error, built.details["out_of_space"])
        return built
    ref = reference(module, example) if ref is None else ref
    degenerate = insensitive(module, example, ref)
    if degenerate:
        return Result("check_failed", degenerate, details=backend.details())
    artifact_dir = key.directory(cache_root)
    stale = None
    for use_cache in (True, False):
        try:
            engine, compile_s, cached, rebuilt = _compile(backend, module, example, target, precision, artifact_dir,
                                                          use_cache)
        except OutOfSpace:  # stops the run: every build after it would fail alike
            raise
        except Exception as e:  # recorded; the caller goes on
            interrupts.check()  # unless it was a Ctrl-C the backend re-raised as its own error
            return Result("compile_failed", one_line(e), details=backend.details())
        if cached and built is not None and not built.details.get("cached"):
            compile_s, cached = built.compile_s + compile_s, False  # the worker's fresh build
            engine.details["build_process"] = "worker"
        built = None  # a rebuild below is this process's own
        details = {**backend.details(), **engine.details, "cached": cached}
        if stale or rebuilt:
            details["rebuilt"] = f"the cached artifact failed the check: {stale}" if stale else rebuilt
        try:
            problem = check_output(engine(example), ref, precision)
        except Exception as e:
            problem = f"engine raised on the check input: {one_line(e)}"
        if problem is None:
            return Result("ok", "", round(compile_s, 3), details, engine=engine)
        if not cached:
            shutil.rmtree(artifact_dir, ignore_errors=True)  # a retry compiles afresh
            return Result("check_failed", problem, round(compile_s, 3), details)
        stale = problem
    raise AssertionError("unreachable")


def built(backend, module: torch.nn.Module, example: torch.Tensor, target, precision: str,
          artifact_dir: Path) -> Result:
    """Compile one artifact into ``artifact_dir`` without checking it (what a build worker runs;
    ``trial(..., built=)`` checks it): ``ok`` with the compile time and the build's details, or
    ``compile_failed``. An artifact already there is kept (``cached``)."""
    try:
        engine, compile_s, cached, rebuilt = _compile(backend, module, example, target, precision, artifact_dir,
                                                      True)
    except OutOfSpace:
        raise
    except Exception as e:
        interrupts.check()
        return Result("compile_failed", one_line(e), details=backend.details())
    details = {**backend.details(), **engine.details, "cached": cached}
    if rebuilt:
        details["rebuilt"] = rebuilt
    return Result("ok", "", round(compile_s, 3), details)


def exported(backend, module: torch.nn.Module, example: torch.Tensor, target, precision: str, key: ArtifactKey,
             cache_root: Path) -> Result:
    """Build (or find cached) the artifact for a board: ``ok`` with ``artifact`` set, or
    ``compile_failed``. Errors that make every build impossible (a missing cross compiler) are
    the caller's to check first with ``backend.check_export``."""
    artifact_dir = key.directory(cache_root)
    t0 = time.perf_counter()
    rebuilt = None
    if backend.has_artifact(artifact_dir):
        why = untrusted_files(backend.artifact_files(artifact_dir))
        if why is None:  # a board runs what it is sent: only what this installation built
            return Result("ok", "", round(time.perf_counter() - t0, 3),
                          {**backend.details(), **_build_details(artifact_dir), "cached": True},
                          artifact=artifact_dir / backend.artifact)
        rebuilt = f"the cached artifact was not sent: {why}"
        shutil.rmtree(artifact_dir, ignore_errors=True)
    artifact_dir.mkdir(parents=True, exist_ok=True)
    ensure_space(module, artifact_dir)
    try:
        out = backend.export(module, example, target, precision, artifact_dir)
    except Exception as e:
        interrupts.check()
        return Result("compile_failed", one_line(e), details=backend.details())
    _signed(backend, artifact_dir)
    _keep_build_details(artifact_dir, out.details)
    details = {**backend.details(), **out.details, "cached": False} | ({"rebuilt": rebuilt} if rebuilt else {})
    return Result("ok", "", round(time.perf_counter() - t0, 3), details, artifact=out.path)


def timed_call(backend, result: Result, native, cuda_graphs: bool = False) -> tuple[Callable[[], object], Result]:
    """What the protocol times for an ``ok`` result and its prepared input ``native``, and the
    result with a ``cuda_graph`` detail when graphs were asked for: ``"replayed"`` (the replay of
    a captured call is timed, its output checked against the plain call's), or why not (the backend
    launches on streams of its own, the capture failed, the replay differs) and the plain call is
    timed. Without ``cuda_graphs`` the plain call, and the result unchanged."""
    engine = result.engine

    def plain():
        return engine.run(native)

    if not cuda_graphs:
        return plain, result

    def said(why: str, fn) -> tuple[Callable[[], object], Result]:
        return fn, result.replace(details={**result.details, "cuda_graph": why})

    if not backend.graph_capturable:
        return said(f"not captured: {backend.name} launches on streams of its own", plain)
    try:
        replay, captured = capture_cuda_graph(plain)
        expected = engine.to_torch(plain())
        replay()
        problem = check_output(engine.to_torch(captured), expected, "fp32")
    except Exception as e:  # recorded; the plain call is timed instead
        return said(f"not captured: {one_line(e)}", plain)
    if problem:
        return said(f"not used: the replay differs from the plain call ({problem})", plain)
    return said("replayed", replay)
