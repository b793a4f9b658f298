"""Drives CMake (CMakeLists.txt is the build's one home) and puts the modules it builds into the package.

Extra CMake arguments come from the CMAKE_ARGS environment variable, e.g.
CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=90-real -DPYALEXNET_CUDA=OFF" pip install .
"""

import os
import shlex
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()  # .../pyalexnet
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        # pip builds in the source tree, each time from another temporary environment: a cache left by an
        # earlier build points at tools (ninja, cmake) that no longer exist, so always configure afresh.
        (build_dir / "CMakeCache.txt").unlink(missing_ok=True)
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        try:
            import ninja  # noqa: F401

            args.append("-GNinja")
        except ImportError:
            pass
        args += shlex.split(os.environ.get("CMAKE_ARGS", ""))
        source = Path(__file__).parent.resolve()
        subprocess.run(["cmake", "-S", str(source), "-B", str(build_dir), *args], check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", jobs], check=True)


setup(ext_modules=[CMakeExtension("pyalexnet._kernels")], cmdclass={"build_ext": CMakeBuild})
