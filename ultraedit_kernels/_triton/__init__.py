"""Triton kernels of the ``triton`` backend (one module per op; importing one imports Triton).

The op files never import this package: :mod:`ultraedit_kernels._optional_backends` imports
a module of ``OPTIONAL_MODULES`` the first time its op needs it (a call, or an availability
check for a CUDA device or under the interpreter), and the module registers its launcher with
:func:`ultraedit_kernels._backends.register_impl`.  ``python -m ultraedit_kernels._triton.aot``
compiles every kernel configuration ahead of time for sm_80 / sm_90 without a GPU.
"""
