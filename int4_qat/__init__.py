"""int4-qat: INT4 / MXFP4 / NVFP4 quantization-aware training on Megatron-Core with NVIDIA ModelOpt,
exported to SGLang-loadable checkpoints. See docs/DESIGN.md for the module map."""

__version__ = "0.1.0"
