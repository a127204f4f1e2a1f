"""Build script: metadata lives in pyproject.toml; this file only adds the native extension.

Switches (environment variables, read here, no hardware or network probing):
  ULTRAEDIT_SKIP_NATIVE_BUILD=1   build no C++/CUDA code (the package works without it)
  ULTRAEDIT_SKIP_CUDA_BUILD=1     build only the host (C++) part
  TORCH_CUDA_ARCH_LIST            CUDA architectures (default "8.0;8.6;8.9;9.0")
  MAX_JOBS                        parallel compile jobs
The extension is optional: when it cannot be configured the install still succeeds and
`python -m ultraedit_kernels.info` says why it is missing.
"""
import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ext_modules, cmdclass = [], {}
if os.environ.get("ULTRAEDIT_SKIP_NATIVE_BUILD", "0") != "1":
    try:
        import setup_native
    except ImportError as err:  # torch missing, or the native build helper absent
        print(f"ultraedit-kernels: building without the native extension ({err})", file=sys.stderr)
    else:
        ext_modules = setup_native.native_extensions()
        cmdclass = setup_native.build_commands() if ext_modules else {}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
