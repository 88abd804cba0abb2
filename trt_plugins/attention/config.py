"""InfLLM v2 settings, importable without torch (the TensorRT plugins on a device read them too)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InfLLMv2Config:
    """The `sparse_config` of a MiniCPM4 config.json; defaults are the published values."""
    kernel_size: int = 32
    kernel_stride: int = 16
    init_blocks: int = 1
    block_size: int = 64
    window_size: int = 2048
    topk: int = 64
    use_nope: bool = False
    dense_len: int = 8192

    def __post_init__(self):
        if self.use_nope:
            raise ValueError("sparse_config.use_nope=true (kernels on pre-RoPE keys) is not supported; "
                             "the released MiniCPM4 models use false")
        if self.block_size % self.kernel_stride or self.kernel_size % self.kernel_stride:
            raise ValueError("sparse_config: kernel_stride must divide kernel_size and block_size")
        if self.window_size % self.block_size:
            raise ValueError("sparse_config: block_size must divide window_size")
        if self.topk <= self.init_blocks:
            raise ValueError("sparse_config: topk must exceed init_blocks")

    @property
    def window_blocks(self) -> int:
        return self.window_size // self.block_size

    @property
    def max_selected(self) -> int:
        """Blocks one query attends at most: init + best (topk - init) + the local window."""
        return self.topk + self.window_blocks
