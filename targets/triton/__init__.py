"""Triton kernels for the chunkwise scans (the ``triton`` target).

``common`` holds the in-kernel building blocks, ``forward`` and ``backward``
the kernels and their launchers, ``ops`` the ``torch.library`` custom ops
(fake implementations and autograd).  Importing this package needs ``triton``;
the kernels run on a CUDA device, or on CPU tensors under ``TRITON_INTERPRET=1``.
"""
