"""InfLLM v2 settings, importable without torch (the TensorRT plugins on a device read them too)."""
from __future__ import annotations

from dataclasses import dataclass

REVISIONS = (1, 2)  # 1: MiniCPM4 (June 2025); 2: MiniCPM4.1 (September 2025), see docs/model.md
LSE_KERNEL_FACTOR = 4  # revision 2's coarse keys: kernel_size * 4, kernel_stride * 4 (fixed in the official code)


@dataclass(frozen=True)
class InfLLMv2Config:
    """The `sparse_config` of a MiniCPM4 config.json; defaults are the published values.

    revision is this kit's own key (the official configs of both releases carry the same keys): 1 selects
    init + window + (topk - init) best blocks; 2 selects topk + window blocks with the window and init
    blocks forced in, scored by a stage 1 whose softmax normaliser comes from coarser compressed keys.
    """
    kernel_size: int = 32
    kernel_stride: int = 16
    init_blocks: int = 1
    block_size: int = 64
    window_size: int = 2048
    topk: int = 64
    use_nope: bool = False
    dense_len: int = 8192
    revision: int = 1

    def __post_init__(self):
        if self.use_nope:
            raise ValueError("sparse_config.use_nope=true (kernels on pre-RoPE keys) is not supported; "
                             "the released MiniCPM4 models use false")
        if self.revision not in REVISIONS:
            raise ValueError(f"sparse_config: revision must be 1 (MiniCPM4) or 2 (MiniCPM4.1), got {self.revision!r}")
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
        """Blocks one query attends at most: revision 1, init + best (topk - init) + the local window;
        revision 2, the topk + window blocks of its top-k."""
        return self.topk + self.window_blocks

    @property
    def lse_kernel_size(self) -> int:
        """Revision 2: the coarse compressed keys (stage 1's softmax normaliser) average this many keys."""
        return self.kernel_size * LSE_KERNEL_FACTOR

    @property
    def lse_kernel_stride(self) -> int:
        return self.kernel_stride * LSE_KERNEL_FACTOR
