"""The build: the CUDA kernels' resource report (no spills), and the CMake build with its C++ tests.

The report fastlstm/_C.ptxas.json is written by setup.py next to fastlstm._C from ptxas -v.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

import fastlstm
from fastlstm import _backends

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_report():
    module = _backends.extension()
    if module is None:
        pytest.skip(f"fastlstm._C is not built: {_backends._import_extension()[1]}")
    # Next to the extension, or in the package directory (editable installs).
    candidates = [os.path.join(os.path.dirname(os.path.abspath(path)), "_C.ptxas.json")
                  for path in (module.__file__, fastlstm.__file__)]
    report_path = next((path for path in candidates if os.path.exists(path)), candidates[0])
    if not os.path.exists(report_path):
        pytest.fail(f"{report_path} is missing: setup.py writes it when it builds fastlstm._C; "
                    "rebuild")
    with open(report_path) as handle:
        report = json.load(handle)
    if module.has_cuda() != report["cuda"]:
        pytest.fail(f"{report_path} describes a build with cuda={report['cuda']} but fastlstm._C "
                    f"has has_cuda()={module.has_cuda()}: the report is stale; rebuild")
    return report


def test_cuda_kernels_do_not_spill():
    report = _load_report()
    if not report["cuda"]:
        pytest.skip(f"fastlstm._C was built without CUDA kernels ({report['reason']}), so there "
                    "is no ptxas report to check")
    assert "error" not in report, report.get("error")
    kernels = report["kernels"]
    assert kernels, "the report lists no kernels"
    spilling = [k for k in kernels if k["spill_store_bytes"] or k["spill_load_bytes"]]
    assert not spilling, "kernels spill to local memory:\n" + "\n".join(
        f"  {k['kernel']} ({k['arch']}): {k['registers']} registers, {k['spill_store_bytes']} "
        f"bytes spill stores, {k['spill_load_bytes']} bytes spill loads" for k in spilling)


def test_ptxas_report_parser():
    spec = importlib.util.spec_from_file_location("fastlstm_setup", os.path.join(ROOT, "setup.py"))
    setup_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_module)  # defines functions only; setup() runs as __main__
    text = (
        "ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z6kernelPf\n"
        "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 2048 bytes smem, 368 bytes cmem[0]\n"
        "ptxas info    : Compiling entry function '_Z5otherv' for 'sm_80'\n"
        "ptxas info    : Function properties for _Z5otherv\n"
        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas info    : Used 32 registers, used 0 barriers, 356 bytes cmem[0]\n")
    kernels = setup_module.parse_ptxas_report(text)
    assert kernels == [
        {"kernel": "_Z6kernelPf", "arch": "sm_90", "registers": 255, "shared_bytes": 2048,
         "stack_frame_bytes": 8, "spill_store_bytes": 4, "spill_load_bytes": 12},
        {"kernel": "_Z5otherv", "arch": "sm_80", "registers": 32, "shared_bytes": 0,
         "stack_frame_bytes": 0, "spill_store_bytes": 0, "spill_load_bytes": 0},
    ]


@pytest.mark.slow
def test_cmake_build_and_ctest():
    """CMake builds the sources (CPU only) against libtorch and ctest runs the C++ tests.

    About 2-3 minutes on two cores (compiling against the torch headers dominates).
    """
    cmake, ctest = shutil.which("cmake"), shutil.which("ctest")
    if cmake is None or ctest is None:
        pytest.skip("cmake/ctest are not installed")
    with tempfile.TemporaryDirectory() as build:
        jobs = os.environ.get("MAX_JOBS", "2")
        configure = subprocess.run(
            [cmake, "-S", ROOT, "-B", build, "-DFASTLSTM_BUILD_CUDA=OFF",
             f"-DPython3_EXECUTABLE={sys.executable}"], capture_output=True, text=True)
        assert configure.returncode == 0, configure.stdout[-4000:] + configure.stderr[-4000:]
        compiled = subprocess.run([cmake, "--build", build, "-j", jobs], capture_output=True,
                                  text=True)
        assert compiled.returncode == 0, compiled.stdout[-4000:] + compiled.stderr[-4000:]
        tested = subprocess.run([ctest, "--test-dir", build, "--output-on-failure"],
                                capture_output=True, text=True)
        assert tested.returncode == 0, tested.stdout[-4000:] + tested.stderr[-4000:]
        assert "100% tests passed" in tested.stdout


def _setup_module():
    spec = importlib.util.spec_from_file_location("fastlstm_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # main() is guarded: importing builds nothing
    return module


def test_extension_links_libstdcxx_shared():
    """Two copies of libstdc++ in one process crash on the first error message that formats a
    number: fastlstm._C must use the process's shared libstdc++, never a static copy."""
    module = _backends.extension()
    if module is None:
        pytest.skip(f"fastlstm._C is not built: {_backends._import_extension()[1]}")
    needed = _setup_module().elf_needed(module.__file__)
    assert any(name.startswith("libstdc++") for name in needed), needed
    # And an error path with numbers in its message raises (it is where a second copy crashed).
    with pytest.raises(RuntimeError, match="w_hh"):
        _forward_with_bad_w_hh()


def _forward_with_bad_w_hh():
    import torch
    xg, h0, c0 = torch.zeros(6, 32), torch.zeros(2, 8), torch.zeros(2, 8)
    torch.ops.fastlstm.recurrence_forward(xg, torch.empty(0, dtype=torch.int64), h0, c0,
                                          torch.zeros(32, 5), None, False, False)


@pytest.mark.skipif(sys.platform != "linux" or shutil.which("g++") is None,
                    reason="needs g++ on Linux")
def test_static_libstdcxx_compiler_is_given_the_shared_one(tmp_path, monkeypatch):
    """A compiler that links libstdc++ statically (here g++ -static-libstdc++) makes setup.py
    link the process's shared libstdc++ explicitly, and the result then needs it."""
    wrapper = tmp_path / "static-g++"
    wrapper.write_text(f"#!/bin/sh\nexec {shutil.which('g++')} -static-libstdc++ \"$@\"\n")
    wrapper.chmod(0o755)
    setup = _setup_module()
    monkeypatch.setenv("CXX", str(wrapper))
    args = setup._shared_libstdcxx_args()
    assert len(args) == 1 and os.path.basename(args[0]).startswith("libstdc++.so"), args
    source = tmp_path / "probe.cpp"
    source.write_text("#include <sstream>\n#include <string>\n"
                      "std::string probe(long v) { std::ostringstream s; s << v; return s.str(); }\n")
    static = tmp_path / "static.so"
    subprocess.run([str(wrapper), "-shared", "-fPIC", str(source), "-o", str(static)], check=True)
    assert not any(n.startswith("libstdc++") for n in setup.elf_needed(str(static)))
    fixed = tmp_path / "fixed.so"
    subprocess.run([str(wrapper), "-shared", "-fPIC", str(source), "-o", str(fixed)] + args,
                   check=True)
    assert any(n.startswith("libstdc++") for n in setup.elf_needed(str(fixed)))
    monkeypatch.delenv("CXX")
    assert setup._shared_libstdcxx_args() == []  # the plain compiler links it shared already
