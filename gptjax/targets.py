"""The machine a step is compiled for: the host's own devices, or GPUs and TPUs this host lacks.

    gptjax compile --config configs/gpt2_xl.py --target h100:8 --config.mesh.fsdp=8

A target names a device kind and a count: `h100`, `h100:8`, `h200:8`, a TPU slice in JAX's
topology names (`v5e:2x2`, `v5p:2x2x1`, `v4:2x2x1`, `v6e:2x2`) or `cpu:N`. GPU and TPU targets
are built from device descriptions alone (`jax.experimental.topologies`): XLA's GPU compiler
with the GPU's target config below, libtpu for TPU slices; nothing is run and no device is opened,
so the host may be any machine with the plugins installed (`pip install 'gptjax[targets]'`).

What the code being traced takes the platform to be (`attention="auto"`, `dtype="auto"`, whether a
Pallas kernel runs in interpret mode) is `current()`: the host's first device, or the target of
an enclosing `compiling_for(target)`. Nothing is autotuned without the device, so a real GPU may
choose other tiles and kernels for the same program; the program's structure, its collectives,
its custom calls and its memory plan are the compiler's own.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import importlib.util
import os
import re
import tempfile

from gptjax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Platform:
    """What traced code may ask of the machine: "cpu", "gpu" or "tpu", and the device kind."""

    name: str
    device_kind: str
    compute_capability: tuple[int, int] | None = None  # an NVIDIA GPU's (major, minor)

    @property
    def nvidia(self) -> bool:
        return self.name == "gpu" and "nvidia" in self.device_kind.lower()

    @property
    def hopper(self) -> bool:
        """An sm_90 GPU (H100, H200): wgmma and TMA, what the Mosaic GPU attention kernel runs on."""
        return self.nvidia and self.compute_capability is not None and self.compute_capability[0] == 9


def _capability(device) -> tuple[int, int] | None:
    raw = getattr(device, "compute_capability", None)  # "9.0" on a CUDA device
    try:
        major, minor = str(raw).split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


_CURRENT: contextvars.ContextVar[Platform | None] = contextvars.ContextVar("gptjax_platform", default=None)


def current() -> Platform:
    """The platform code is traced for: the enclosing `compiling_for` target's, else the host's."""
    chosen = _CURRENT.get()
    if chosen is not None:
        return chosen
    import jax
    first = jax.devices()[0]
    return Platform(jax.default_backend(), first.device_kind, _capability(first))


@contextlib.contextmanager
def compiling_for(platform: Platform):
    token = _CURRENT.set(platform)
    try:
        yield platform
    finally:
        _CURRENT.reset(token)


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    """The device facts XLA's GPU compiler plans with (its GpuTargetConfig), per SXM part."""

    name: str  # the driver's device name, which is also jax's device_kind
    memory_bytes: int  # what the driver reports as the device's total memory
    sms: int
    clock_ghz: float
    memory_bandwidth: int  # bytes/s
    l2_bytes: int
    shared_per_sm: int
    shared_per_block_optin: int
    compute_capability: tuple[int, int]
    cudnn: tuple[int, int, int]  # the cuDNN the plan assumes (cuDNN attention needs >= 8.9)

    def target_config(self) -> str:
        major, minor = self.compute_capability
        info = {
            "threads_per_block_limit": 1024, "threads_per_warp": 32, "shared_memory_per_block": 48 * 1024,
            "shared_memory_per_core": self.shared_per_sm, "threads_per_core_limit": 2048,
            "core_count": self.sms, "fpus_per_core": 128, "block_dim_limit_x": 2 ** 31 - 1,
            "block_dim_limit_y": 65535, "block_dim_limit_z": 65535, "memory_bandwidth": self.memory_bandwidth,
            "l2_cache_size": self.l2_bytes, "clock_rate_ghz": self.clock_ghz,
            "device_memory_size": self.memory_bytes, "shared_memory_per_block_optin": self.shared_per_block_optin,
            "registers_per_core_limit": 65536, "registers_per_block_limit": 65536,
        }
        fields = "\n".join(f"  {k}: {v}" for k, v in info.items())
        a, b, c = self.cudnn
        return (f"gpu_device_info {{\n{fields}\n  cuda_compute_capability {{ major: {major} minor: {minor} }}\n}}\n"
                f'platform_name: "CUDA"\ndnn_version_info {{ major: {a} minor: {b} patch: {c} }}\n'
                f'device_description_str: "{self.name}"\n')


# Hopper SXM parts: 132 SMs at up to 1.98 GHz, 228 KiB of shared memory per SM (227 KiB to one
# block), 50 MiB of L2; they differ in HBM (80 GB HBM3 at 3.35 TB/s, 141 GB HBM3e at 4.8 TB/s).
GPUS = {
    "h100": GpuSpec("NVIDIA H100 80GB HBM3", 84_942_979_072, 132, 1.98, 3_352_320_000_000, 50 * 2 ** 20,
                    228 * 1024, 227 * 1024, (9, 0), (9, 10, 0)),
    "h200": GpuSpec("NVIDIA H200 141GB HBM3e", 151_397_597_184, 132, 1.98, 4_800_000_000_000, 50 * 2 ** 20,
                    228 * 1024, 227 * 1024, (9, 0), (9, 10, 0)),
}

# HBM per TPU device by jax's device_kind (a v5p or v4 chip shows as one device of two cores).
TPU_MEMORY_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95, "TPU v6 lite": 32}
TPU_GENERATIONS = ("v4", "v5e", "v5p", "v6e")

# JAX's GPU allocator takes this share of the device by default (XLA_PYTHON_CLIENT_MEM_FRACTION):
# a step whose plan needs more runs out of memory though the device is larger.
DEFAULT_GPU_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: Platform
    devices: tuple
    device_bytes: int  # the memory of one device
    usable_bytes: int  # what a step may plan for on one device
    note: str = ""  # how usable_bytes was arrived at

    @property
    def device_gib(self) -> float:
        return self.device_bytes / 2 ** 30

    @property
    def usable_gib(self) -> float:
        return self.usable_bytes / 2 ** 30


_NAME = re.compile(r"^(?P<kind>[a-z0-9]+)(?::(?P<shape>[0-9x]+))?$")
EXAMPLES = "h100, h100:8, h200:8, v5e:2x2, v5p:2x2x1 or cpu:8"


def parse(name: str) -> tuple[str, str | None]:
    m = _NAME.match(name.strip().lower())
    if not m:
        raise UserError(f"--target {name!r} is not a target; use one of {EXAMPLES}")
    return m.group("kind"), m.group("shape")


def _count(name: str, shape: str | None) -> int:
    if shape is None:
        return 1
    if not shape.isdigit() or int(shape) < 1:
        raise UserError(f"--target {name!r}: the part after ':' is a device count (h100:8)")
    return int(shape)


def needed_host_devices(name: str) -> int:
    """CPU devices the host must be started with for this target (0: the target brings its own)."""
    kind, shape = parse(name)
    return _count(name, shape) if kind == "cpu" else 0


def _quiet(fn, what: str):
    """fn() with the plugin's C++ start-up chatter on stderr held back, shown only if it fails."""
    with tempfile.TemporaryFile() as held:
        saved = os.dup(2)
        os.dup2(held.fileno(), 2)
        try:
            return fn()
        except Exception as e:
            os.dup2(saved, 2)
            held.seek(0)
            log = held.read().decode(errors="replace").strip().splitlines()[-3:]
            raise UserError(f"{what} failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                            + (f" ({' / '.join(log)})" if log else "")) from None
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _missing(module: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise UserError(f"compiling for this target needs {extra}; install it with "
                        f"pip install 'gptjax[targets]' (or pip install -e '.[targets]' in a checkout)")


def _gpu_plugin() -> None:
    if not any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in ("13", "12")):
        _missing("jax_plugins.xla_cuda13", "JAX's CUDA plugin (jax[cuda13-local])")


def _gpu_memory_fraction() -> tuple[float, str]:
    raw = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
    if os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "").lower() == "false" and raw is None:
        return 1.0, "XLA_PYTHON_CLIENT_PREALLOCATE=false: the whole device"
    if raw is None:
        return DEFAULT_GPU_FRACTION, f"JAX's GPU allocator takes {DEFAULT_GPU_FRACTION:.0%} of the device"
    try:
        fraction = float(raw)
    except ValueError:
        raise UserError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={raw!r} is not a number between 0 and 1") from None
    return fraction, f"XLA_PYTHON_CLIENT_MEM_FRACTION={raw}"


def open_target(name: str) -> Target:
    """The devices of target `name`, built without the hardware."""
    import jax

    kind, shape = parse(name)
    if kind == "cpu":
        count = _count(name, shape)
        if len(jax.devices("cpu")) < count:
            raise UserError(f"--target {name} needs {count} CPU devices and this process has "
                            f"{len(jax.devices('cpu'))}; `gptjax compile` makes them when it starts, so run it "
                            f"in a fresh process")
        devices = jax.devices("cpu")[:count]
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // count  # shared by the devices
        return Target(name, Platform("cpu", devices[0].device_kind), tuple(devices), memory, memory,
                      "the host's memory shared by its devices")
    from jax.experimental import topologies
    if kind in GPUS:
        count = _count(name, shape)
        spec = GPUS[kind]
        _gpu_plugin()
        per_host = min(count, 8)
        if count % per_host:
            raise UserError(f"--target {name}: more than 8 GPUs come as whole hosts of 8 (h100:16, h100:32, ...)")
        topology = f"1x{count // per_host}x{per_host}"
        topo = _quiet(lambda: topologies.get_topology_desc(platform="cuda", target_config=spec.target_config(),
                                                           topology=topology), f"the CUDA topology for {name}")
        fraction, note = _gpu_memory_fraction()
        return Target(name, Platform("gpu", spec.name, spec.compute_capability), tuple(topo.devices), spec.memory_bytes,
                      int(spec.memory_bytes * fraction), note)
    if kind in TPU_GENERATIONS:
        if shape is None:
            raise UserError(f"--target {name}: a TPU target names its slice, as {kind}:2x2 or {kind}:2x2x1")
        _missing("libtpu", "libtpu (jax[tpu])")
        topo = _quiet(lambda: topologies.get_topology_desc(topology_name=f"{kind}:{shape}", platform="tpu"),
                      f"the TPU topology {name}")
        device_kind = topo.devices[0].device_kind
        memory = int(TPU_MEMORY_GIB.get(device_kind, 0) * 2 ** 30)
        if not memory:
            raise UserError(f"--target {name}: no memory size known for {device_kind!r}")
        return Target(name, Platform("tpu", device_kind), tuple(topo.devices), memory, memory, "the device's HBM")
    raise UserError(f"--target {name!r}: unknown device {kind!r}; use one of {EXAMPLES}")


def host_target(count: int) -> Target:
    """`count` of this host's own devices: its accelerators when it has that many, else as many
    CPU devices (which the process must have been started with)."""
    import jax

    devices = jax.devices() if jax.device_count() >= count else jax.devices("cpu")
    if len(devices) < count:
        raise UserError(f"the mesh needs {count} devices and this process has {len(devices)}; run it in a fresh "
                        f"process, which makes them, or pass --target")
    first = devices[0]
    stats = (first.memory_stats() or {}) if first.platform != "cpu" else {}
    if "bytes_limit" in stats:  # what the allocator of a started accelerator may hand out
        memory, usable, note = stats["bytes_limit"], stats["bytes_limit"], "the allocator's limit"
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // count
        usable, note = memory, "the host's memory shared by its devices"
    platform = Platform(first.platform if first.platform != "cuda" else "gpu", first.device_kind, _capability(first))
    return Target(f"{platform.name}:{count}", platform, tuple(devices[:count]), memory, usable, note)


def prepare_host(target_name: str, fake_devices: int = 0) -> None:
    """Before a backend starts: for a target, JAX on the host's CPU alone, whatever JAX_PLATFORMS
    says (a CUDA or TPU plugin would otherwise try to open a device that may not be there); and
    as many CPU devices as a cpu:N target, or else `fake_devices`, asks for (they cost nothing
    until used, and a GPU host keeps its GPUs)."""
    from gptjax import xla_flags
    if xla_flags.backends_started():
        return
    if target_name:
        import jax
        jax.config.update("jax_platforms", "cpu")
    need = needed_host_devices(target_name) if target_name else fake_devices
    present = os.environ.get("XLA_FLAGS", "")
    if need > 1 and "xla_force_host_platform_device_count" not in present:
        os.environ["XLA_FLAGS"] = f"{present} --xla_force_host_platform_device_count={need}".strip()
