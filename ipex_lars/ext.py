"""Build and load the project's C++ extensions.

Each extension is compiled once with ``torch.utils.cpp_extension`` into a
directory keyed by the torch version, the CPU's vector ISA and a hash of the
sources and flags, so a stale or foreign build is never loaded. ``env/setup.sh``
builds everything up front (``ipex-lars build``) and later loads import the built
library directly. A process that finds no build for its torch, ISA and sources
(e.g. after ``IPEX_LARS_ISA`` names another ISA, or a pip install without setup)
compiles it at its first load; torch's build lock in the build directory makes
ranks that start together wait for that one compile instead of racing.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from affinity.machine import ISAS, this_machine

CSRC = Path(__file__).parent / "csrc"


class ExtensionBuildError(RuntimeError):
    """An extension could not be built or loaded; the message says how to fix it."""


@dataclass(frozen=True)
class ExtensionSpec:
    """What to compile for one extension and how."""

    name: str  # module name of the built library; must not shadow a Python module
    sources: tuple[str, ...]  # file names under ipex_lars/csrc
    extra_cflags: tuple[str, ...] = ()
    extra_include_paths: tuple[str, ...] = ()
    extra_ldflags: tuple[str, ...] = ()
    needs: tuple[str, ...] = field(default=())  # human-readable prerequisites, for errors


def kernel_isa() -> str:
    """The vector ISA to build and load kernels for: ``IPEX_LARS_ISA`` if set, else the CPU's best.

    The override (``avx512``, ``avx2`` or ``default``) builds and runs a lower ISA's path on a
    machine that has a higher one, so every path is tested anywhere. An ISA the CPU cannot
    execute is refused rather than crashing with an illegal instruction.
    """
    cpu = this_machine().cpu
    wanted = os.environ.get("IPEX_LARS_ISA", "").strip().lower()
    if not wanted:
        return cpu.vector_isa
    if wanted not in ISAS:
        raise ExtensionBuildError(
            f"IPEX_LARS_ISA={wanted!r} is not one of {', '.join(ISAS)}; unset it to use "
            f"the CPU's best ({cpu.vector_isa})"
        )
    if wanted not in cpu.isas():
        raise ExtensionBuildError(
            f"IPEX_LARS_ISA={wanted}: this CPU cannot execute it (it can: "
            f"{', '.join(cpu.isas())}); unset it or pick one of those"
        )
    return wanted


_ISA_FLAGS = {
    "avx512": [
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mfma",
        "-mavx2",
        "-mf16c",
        "-DCPU_CAPABILITY=AVX512",
        "-DCPU_CAPABILITY_AVX512",
    ],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "default": ["-DCPU_CAPABILITY=DEFAULT"],
}


def _cflags(spec: ExtensionSpec, isa: str) -> list[str]:
    # -fopenmp: at::parallel_for is header-inline OpenMP and runs serially without it.
    # The library then needs libgomp.so.1, which resolves to the copy torch already loaded.
    return ["-O3", "-fopenmp", *_ISA_FLAGS[isa], *spec.extra_cflags]


def _ldflags(spec: ExtensionSpec) -> list[str]:
    return ["-fopenmp", *spec.extra_ldflags]


def module_name(spec: ExtensionSpec, isa: str) -> str:
    """One module per ISA, so builds for several ISAs can be loaded side by side (tests do)."""
    return f"{spec.name}_{isa}"


def build_dir(spec: ExtensionSpec, isa: str | None = None) -> Path:
    """Where this extension's build for this torch, ISA (default: ``kernel_isa()``) and source lives."""
    import torch

    isa = isa or kernel_isa()
    digest = hashlib.sha256()
    for src in spec.sources:
        digest.update((CSRC / src).read_bytes())
    for flag in (
        *_cflags(spec, isa),
        *spec.extra_include_paths,
        *_ldflags(spec),
        sys.implementation.cache_tag,
        os.environ.get("CXX", "c++"),
    ):
        digest.update(flag.encode())
    root = Path(
        os.environ.get("IPEX_LARS_BUILD_DIR")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ipex-lars" / "ext"
    )
    return root / f"{spec.name}-torch{torch.__version__}-{isa}-{digest.hexdigest()[:12]}"


def library_path(spec: ExtensionSpec, isa: str | None = None) -> Path:
    """The built library (the name torch.utils.cpp_extension gives it)."""
    isa = isa or kernel_isa()
    return build_dir(spec, isa) / f"{module_name(spec, isa)}.so"


def _check_toolchain(spec: ExtensionSpec) -> None:
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise ExtensionBuildError(
            f"cannot build {spec.name}: no C++ compiler '{cxx}' on PATH. "
            "Install one (Debian/Ubuntu: apt-get install g++) or set CXX."
        )
    if not cpp_extension.is_ninja_available():
        raise ExtensionBuildError(
            f"cannot build {spec.name}: ninja is missing. Install it: pip install ninja (env/setup.sh does this)."
        )
    python_h = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not python_h.exists():
        raise ExtensionBuildError(
            f"cannot build {spec.name}: Python headers not found ({python_h}). "
            "Install them (Debian/Ubuntu: apt-get install python3-dev)."
        )
    for path in spec.extra_include_paths:
        if not Path(path).is_dir():
            raise ExtensionBuildError(
                f"cannot build {spec.name}: include directory {path} is missing; needs "
                f"{', '.join(spec.needs) or 'its dependencies'} (env/setup.sh installs them)."
            )


def build(spec: ExtensionSpec, verbose: bool = False, isa: str | None = None) -> Path:
    """Compile the extension if this torch/ISA/source has no build yet; return the library path."""
    isa = isa or kernel_isa()
    lib = library_path(spec, isa)
    if lib.exists():
        return lib
    _check_toolchain(spec)
    from torch.utils import cpp_extension

    out = lib.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExtensionBuildError(
            f"cannot create the build directory {out}: {exc.strerror}; set IPEX_LARS_BUILD_DIR to a writable folder"
        ) from None
    try:
        cpp_extension.load(
            name=module_name(spec, isa),
            sources=[str(CSRC / s) for s in spec.sources],
            extra_cflags=_cflags(spec, isa),
            extra_include_paths=list(spec.extra_include_paths),
            extra_ldflags=_ldflags(spec),
            build_directory=str(out),
            verbose=verbose,
            is_python_module=True,
        )
    except Exception as exc:  # the compiler's own output is in exc
        raise ExtensionBuildError(
            f"building {spec.name} in {out} failed:\n{exc}\n"
            "Fix the error above, or report it with the output of `ipex-lars doctor`."
        ) from exc
    if not lib.exists():
        raise ExtensionBuildError(f"building {spec.name} produced no {lib.name} in {out}")
    return lib


def load(spec: ExtensionSpec, isa: str | None = None) -> ModuleType:
    """Import the extension for ``isa`` (default: ``kernel_isa()``), building it first if needed
    (normally done by env/setup.sh)."""
    return _load(spec, isa or kernel_isa())


@functools.cache
def _load(spec: ExtensionSpec, isa: str) -> ModuleType:
    import torch  # noqa: F401  (the library links against libtorch, which must be loaded first)

    lib = build(spec, isa=isa)
    name = module_name(spec, isa)
    module_spec = importlib.util.spec_from_file_location(name, lib)
    if module_spec is None or module_spec.loader is None:
        raise ExtensionBuildError(f"{lib} is not a loadable Python extension")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except ImportError as exc:
        raise ExtensionBuildError(
            f"{lib} failed to load: {exc}. Remove {lib.parent} and run `ipex-lars build`."
        ) from exc
    sys.modules[name] = module
    return module
