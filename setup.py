"""Build fastlstm and its compiled extension fastlstm._C.

Environment flags (and nothing else) steer the build:
  FASTLSTM_BUILD_CUDA  auto (default): CUDA kernels when nvcc and a CUDA build of torch are present;
                       1: CUDA kernels or a loud failure; 0: C++ CPU kernels only
  FASTLSTM_CUDA_ARCHS  compute capabilities, default "8.0;9.0" (PTX is embedded for the newest)
  MAX_JOBS             parallel compile jobs (ninja)
Install with `pip install --no-build-isolation -e .` so the build uses the installed torch.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources():
    """The one source list, shared with CMakeLists.txt (which reads csrc/sources.txt)."""
    with open(os.path.join(ROOT, "csrc", "sources.txt")) as handle:
        names = [line.strip() for line in handle if line.strip() and not line.startswith("#")]
    return [os.path.join("csrc", name) for name in names]


def _toolkit_root_of_nvcc():
    """The CUDA toolkit that the nvcc on PATH belongs to, even when that nvcc is a wrapper script.

    torch.utils.cpp_extension guesses CUDA_HOME as the parent of nvcc's directory, which is wrong
    for a wrapper such as /usr/local/bin/nvcc (it then links against a missing -lcudart); nvcc's
    own dry run names its real root.
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        result = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (result.stdout + result.stderr).splitlines():
        if line.startswith("#$ TOP="):
            root = os.path.realpath(line.split("=", 1)[1].strip())
            if os.path.exists(os.path.join(root, "bin", "nvcc")):
                return root
    return None


def elf_needed(path):
    """The DT_NEEDED entries (shared libraries) of a 64-bit little-endian ELF file."""
    import struct
    with open(path, "rb") as handle:
        data = handle.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path}: not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
                for i in range(shnum)]
    needed = []
    for _name, kind, _flags, _addr, offset, size, link, _info, _align, entsize in sections:
        if kind != 6:  # SHT_DYNAMIC
            continue
        strtab = sections[link][4]
        for at in range(offset, offset + size, entsize or 16):
            tag, value = struct.unpack_from("<qQ", data, at)
            if tag == 0:
                break
            if tag == 1:  # DT_NEEDED
                end = data.index(b"\0", strtab + value)
                needed.append(data[strtab + value:end].decode())
    return needed


def _shared_libstdcxx_args():
    """Link arguments that keep libstdc++ a shared library of fastlstm._C.

    A compiler that has only a static libstdc++ beside it (a GCC installed under /opt, say)
    copies libstdc++ into the extension. The process already has torch's shared libstdc++, and
    with two copies in one process any error message that formats a number crashes (the
    iostream facets of one copy are looked up in the other's locale): every TORCH_CHECK with a
    size in it segfaults instead of raising. A trial link tells; if it comes out static, the
    libstdc++ this process has loaded is linked explicitly, so the compiler's static copy
    supplies nothing.
    """
    cxx = os.environ.get("CXX", "c++")
    if sys.platform != "linux" or shutil.which(cxx) is None:
        return []
    with tempfile.TemporaryDirectory() as scratch:
        source = os.path.join(scratch, "probe.cpp")
        library = os.path.join(scratch, "probe.so")
        with open(source, "w") as handle:
            handle.write("#include <sstream>\n#include <string>\n"
                         "std::string probe(long v) { std::ostringstream s; s << v; "
                         "return s.str(); }\n")
        try:
            subprocess.run([cxx, "-shared", "-fPIC", source, "-o", library], check=True,
                           capture_output=True, timeout=120)
            needed = elf_needed(library)
        except (OSError, subprocess.SubprocessError, ValueError):
            return []
    if any(name.startswith("libstdc++") for name in needed):
        return []
    import torch  # noqa: F401  (loads the libstdc++ the extension will run with)
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if os.path.basename(path).startswith("libstdc++.so"):
                print(f"fastlstm: {cxx} links libstdc++ statically; linking {path} instead",
                      file=sys.stderr)
                return [path]
    return []


def _extensions():
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and \
            os.environ.get("FASTLSTM_BUILD_CUDA", "auto") != "0":
        root = _toolkit_root_of_nvcc()
        if root is not None:  # must be set before torch.utils.cpp_extension is imported
            os.environ["CUDA_HOME"] = root
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("fastlstm: torch is not installed; building without fastlstm._C", file=sys.stderr)
        return [], {}
    mode = os.environ.get("FASTLSTM_BUILD_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"FASTLSTM_BUILD_CUDA must be auto, 0 or 1; got {mode!r}")
    nvcc = shutil.which("nvcc") or (
        cpp_extension.CUDA_HOME and os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")))
    cuda_torch = torch.version.cuda is not None
    if mode == "1" and not (nvcc and cuda_torch):
        raise SystemExit("FASTLSTM_BUILD_CUDA=1 but " + (
            "nvcc was not found (set CUDA_HOME or put nvcc on PATH)" if not nvcc else
            f"torch {torch.__version__} is a CPU-only build"))
    with_cuda = mode == "1" or (mode == "auto" and bool(nvcc) and cuda_torch)

    sources = _sources()
    cpp_sources = [s for s in sources if s.endswith(".cpp")]
    cu_sources = [s for s in sources if s.endswith(".cu")]
    # The C++ standard is left to torch.utils.cpp_extension: it adds the one its headers need
    # (C++17 for torch 2.4, C++20 for recent releases).
    cxx_flags = ["-O3", "-fopenmp"]
    define_macros = []
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        archs = os.environ.get("FASTLSTM_CUDA_ARCHS", "8.0;9.0")
        arch_list = [a.strip() for a in archs.replace(",", ";").split(";") if a.strip()]
        # No --use_fast_math: it turns tanhf into the MUFU.TANH approximation (~2^-11 relative
        # error), far from the 1e-5 agreement with nn.LSTM that fp32 promises.
        nvcc_flags = ["-O3", "-lineinfo",
                      "--expt-relaxed-constexpr", "-Xptxas=-v",
                      "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                      "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
        for index, arch in enumerate(arch_list):
            number = arch.replace(".", "")
            nvcc_flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
            if index == len(arch_list) - 1:  # PTX for the newest, so later GPUs can JIT it
                nvcc_flags.append(f"-gencode=arch=compute_{number},code=compute_{number}")
        # Some torch CUDA headers include cuBLAS/cuSPARSE headers that a bare CUDA toolkit may
        # lack; the pip nvidia packages that come with a CUDA torch ship them.
        import site
        for base in site.getsitepackages() + [site.getusersitepackages()]:
            for sub in ("nvidia/cu13/include", "nvidia/cu12/include", "nvidia/cublas/include",
                        "nvidia/cusparse/include", "nvidia/cuda_runtime/include"):
                path = os.path.join(base, sub)
                if os.path.isdir(path):
                    include_dirs.append(path)
        extension = cpp_extension.CUDAExtension(
            "fastlstm._C", cpp_sources + cu_sources, include_dirs=include_dirs,
            define_macros=define_macros + [("FASTLSTM_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"] + _shared_libstdcxx_args())
    else:
        extension = cpp_extension.CppExtension(
            "fastlstm._C", cpp_sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"] + _shared_libstdcxx_args())
    if not with_cuda:
        why = ("FASTLSTM_BUILD_CUDA=0" if mode == "0" else
               "nvcc was not found" if not nvcc else f"torch {torch.__version__} is CPU-only")
    elif not cu_sources:
        why = "csrc/sources.txt lists no .cu source"
    else:
        why = None
    return [extension], {"build_ext": _build_ext_class(cpp_extension, why)}


# ptxas -v prints, per kernel and architecture:
#   ptxas info    : Compiling entry function '_Z...' for 'sm_90'
#   ptxas info    : Function properties for _Z...
#       0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
#   ptxas info    : Used 128 registers, used 1 barriers, 4096 bytes smem, 400 bytes cmem[0]
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_report(text):
    """Kernel resource usage from ptxas -v output: one dict per (kernel, architecture)."""
    kernels, current = [], None
    for line in text.splitlines():
        entry = _ENTRY.search(line)
        if entry:
            current = {"kernel": entry.group(1), "arch": entry.group(2), "registers": None,
                       "shared_bytes": 0, "stack_frame_bytes": 0, "spill_store_bytes": 0,
                       "spill_load_bytes": 0}
            kernels.append(current)
            continue
        if current is None:
            continue
        frame = _FRAME.search(line)
        if frame:
            current["stack_frame_bytes"] = int(frame.group(1))
            current["spill_store_bytes"] = int(frame.group(2))
            current["spill_load_bytes"] = int(frame.group(3))
        used = _USED.search(line)
        if used:
            current["registers"] = int(used.group(1))
            smem = _SMEM.search(line)
            current["shared_bytes"] = int(smem.group(1)) if smem else 0
    return kernels


def _build_ext_class(cpp_extension, no_cuda_reason):
    """BuildExtension that also writes the CUDA kernels' resource report next to fastlstm._C.

    The report (_C.ptxas.json) comes from ptxas -v, which nvcc runs for every kernel and
    architecture; ninja prints it on the build's standard output, which is captured here (and
    still shown). A build without CUDA writes why, so tests can say so.
    """
    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildExtensionWithReport(base):
        def build_extensions(self):
            with tempfile.TemporaryFile(mode="w+b") as log:
                sys.stdout.flush()
                saved = os.dup(1)
                os.dup2(log.fileno(), 1)
                try:
                    super().build_extensions()
                finally:
                    sys.stdout.flush()
                    os.dup2(saved, 1)
                    os.close(saved)
                    log.seek(0)
                    text = log.read().decode("utf-8", "replace")
                    sys.stdout.write(text)
                    sys.stdout.flush()
            self._ptxas_text = text
            for ext in self.extensions:
                if ext.name == "fastlstm._C":
                    self._write_report(os.path.dirname(self.get_ext_fullpath(ext.name)), text)
                    if getattr(self, "editable_mode", False):
                        # pip install -e: the package is imported from the source tree.
                        self._write_report(os.path.join(ROOT, "fastlstm"), text)

        def copy_extensions_to_source(self):
            # --inplace: setuptools builds in build/ and copies the .so back; the report follows.
            super().copy_extensions_to_source()
            self._write_report(os.path.join(ROOT, "fastlstm"), getattr(self, "_ptxas_text", ""))

        def _write_report(self, directory, text):
            path = os.path.join(directory, "_C.ptxas.json")
            kernels = parse_ptxas_report(text)
            if no_cuda_reason is None and not kernels and os.path.exists(path):
                return  # ninja found nothing to recompile: the last report still holds
            if no_cuda_reason is None and not kernels:
                report = {"cuda": True, "kernels": [],
                          "error": "no ptxas output was captured from the build"}
            elif no_cuda_reason is None:
                report = {"cuda": True, "kernels": kernels}
            else:
                report = {"cuda": False, "reason": no_cuda_reason, "kernels": []}
            os.makedirs(directory, exist_ok=True)
            with open(path, "w") as handle:
                json.dump(report, handle, indent=1)
            print(f"fastlstm: wrote the CUDA resource report {path}")

    return BuildExtensionWithReport


def main():
    ext_modules, cmdclass = _extensions()

    setup(
        name="fastlstm",
        version="0.1.0",
        description="Fused LSTM kernels (Triton, CUDA C++, C++) and recurrent language-model tooling "
                    "for PyTorch",
        packages=find_packages(include=["fastlstm", "fastlstm.*"]),
        python_requires=">=3.9",
        install_requires=["torch>=2.4"],
        extras_require={"triton": ["triton>=3.0"],
                        "test": ["pytest", "hypothesis", "numpy", "scipy"],
                        "bench": ["pytest-benchmark", "matplotlib"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        entry_points={"console_scripts": ["fastlstm=fastlstm.cli:main"]},
    )


# Guarded so tests can import this file for parse_ptxas_report; pip and `python setup.py` run it
# as __main__.
if __name__ == "__main__":
    main()
