"""Triton kernels. Importing this package does not import triton: the kernel
modules are loaded on first use, so ``TRITON_INTERPRET=1`` can still be set
before that (``bench run --interpret``)."""
