"""Attention and layer kernels. Each Triton kernel sits beside a plain-torch reference with the
same signature; the references are also the CPU attention backend's implementation."""
