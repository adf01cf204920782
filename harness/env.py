"""The environment of a run: what machine, how busy, which library versions; thread pinning.

Contract
--------
``capture(device)`` returns a JSON-able dict recorded with every run: CPU model, physical and
logical cores, frequency, load average, the CPU share used by *other* processes (sampled over a
short window with psutil), GPU name and clocks when ``device == "cuda"``, and library versions
read from package metadata (nothing heavy is imported). ``busy`` is true when other processes use
more than ``BUSY_CPU_PERCENT`` of one core: a process spinning on the same cores can slow an
OpenMP backend by 50x, so such runs are flagged (and refused with ``--strict``).

``configure_threads(n)`` gives every CPU backend the same thread count and pins the process to
``n`` cores. It sets the environment variables that OpenMP and TVM read at start-up, so the CLI
calls it before any backend library is imported; ``configure_process(threads, device)`` is that and
strict fp32 on a GPU, what every process that measures sets first. ``quiet_library_warnings()``: the
libraries' deprecation notices off, in every process of a run. ``release_memory()`` collects
garbage and hands freed heap pages back to the system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
import platform
import subprocess
import time
import warnings
from importlib import metadata

import psutil

BUSY_CPU_PERCENT = 25.0  # of one core, used by other processes
# what idle threads do between calls, where the environment sets it (spin or sleep: OpenMP's, Intel
# OpenMP's and TVM's pools); it moves every backend's latency, so a run records it (the test suite
# sets the first and the last)
WAIT_POLICY_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "TVM_THREAD_POOL_SPIN_COUNT")
LIBRARIES = ("torch", "numpy", "onnx", "onnxruntime", "apache-tvm", "apache-tvm-ffi",
             "torch-tensorrt", "tensorrt", "psutil", "pandas")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def physical_cores() -> int:
    return psutil.cpu_count(logical=False) or psutil.cpu_count() or 1


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def cpu_load_sample(window_s: float = 0.5) -> tuple[float, float | None]:
    """Over ``window_s``: CPU used by every process but this one (% of one core), and the CPU time
    the hypervisor took from this VM ("steal", % of all cores; None where the OS does not report it).
    Steal does not show up as another process, yet it slows every backend."""
    me = psutil.Process()
    me.cpu_percent(None)
    psutil.cpu_percent(None)
    psutil.cpu_times_percent(None)
    time.sleep(window_s)
    total = psutil.cpu_percent(None) * psutil.cpu_count()  # % of one core, all cores summed
    steal = getattr(psutil.cpu_times_percent(None), "steal", None)
    return max(0.0, total - me.cpu_percent(None)), steal


def strict_fp32() -> None:
    """fp32 on a GPU means IEEE fp32: TensorFloat-32 off for cuDNN convolutions and matmuls.

    PyTorch lets cuDNN use TF32 for fp32 convolutions by default; on Ampere and later GPUs that is
    a 10-bit mantissa (measured on an H100: DS-MBNet and MobileNetV1 logits 0.01-0.05 off fp32 at
    224x224, failing the fp32 check of 1e-4 + 1e-3 * |eager|), so "fp32" rows would time a
    different arithmetic than they claim, and than the paper's RTX 2080 Ti (no TF32) ran."""
    import torch

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def gpu_info() -> dict:
    info: dict = {}
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info = {"gpu_name": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                    "cuda": torch.version.cuda, "gpu_capability": f"{props.major}.{props.minor}",
                    "tf32": {"cudnn": torch.backends.cudnn.allow_tf32,
                             "matmul": torch.backends.cuda.matmul.allow_tf32}}
    except Exception as e:  # a broken CUDA install is recorded, not fatal
        info = {"gpu_error": str(e)}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.mem,clocks.max.sm,driver_version",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            sm, mem, max_sm, driver = [v.strip() for v in out.stdout.splitlines()[0].split(",")]
            info.update(gpu_clock_sm_mhz=sm, gpu_clock_mem_mhz=mem, gpu_clock_max_sm_mhz=max_sm,
                        driver=driver)
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return info


def capture(device: str = "cpu", window_s: float = 0.5) -> dict:
    freq = psutil.cpu_freq()
    other, steal = cpu_load_sample(window_s)
    env = {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_physical_cores": physical_cores(),
        "cpu_logical_cores": psutil.cpu_count(),
        "cpu_freq_mhz": round(freq.current, 1) if freq else None,
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "other_processes_cpu_percent": round(other, 1),
        "cpu_steal_percent": None if steal is None else round(steal, 1),
        "busy": other > BUSY_CPU_PERCENT,
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None,
        "wait_policy": {var: os.environ[var] for var in WAIT_POLICY_VARS if var in os.environ},  # {}: defaults
        "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "libraries": library_versions(),
    }
    if device == "cuda":
        env.update(gpu_info())
    return env


def configure_threads(n: int) -> int:
    """Use ``n`` threads everywhere (``n <= 0``: all physical cores); pin to ``n`` cores."""
    n = n if n > 0 else physical_cores()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TVM_NUM_THREADS"):
        os.environ[var] = str(n)
    if hasattr(os, "sched_setaffinity"):
        allowed = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, allowed[:n])
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:
        pass
    return n


def configure_process(threads: int, device: str) -> None:
    """A measuring process's set-up: ``threads`` everywhere (:func:`configure_threads`), and on a GPU
    fp32 that is fp32 (:func:`strict_fp32`)."""
    configure_threads(threads)
    if device == "cuda":
        strict_fp32()


def quiet_library_warnings() -> None:
    """TorchScript's and torch.export's deprecation notices are not the user's business; a spawned
    interpreter starts with the default filters, so each process of a run calls this."""
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


@functools.cache
def _libc():
    """glibc's handle when this is Linux with a C library found, else None (looked up once)."""
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name and platform.system() == "Linux" else None


def release_memory() -> None:
    """Collect what is unreachable and hand the freed heap back to the system (glibc's
    ``malloc_trim``; elsewhere the collection only): freed engines otherwise keep their pages in
    the allocator's arenas, and a process started next (``harness.phases.fresh``) needs them."""
    gc.collect()
    try:
        libc = _libc()
        if libc is not None:
            libc.malloc_trim(0)
    except (OSError, AttributeError):  # not loadable, or not glibc (e.g. musl has no malloc_trim)
        pass
