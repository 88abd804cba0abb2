# Vendored read-only from github.com/ProudAurora/SparseMiniCpm, finetune/models/minicpm4/modeling_minicpm.py at
# commit 294ead4db0b6054e30335232312a62b7946d769a: a copy of OpenBMB's MiniCPM4.1 modeling code (InfLLM v2 with
# the second compressed key, `compress_k2`). An excerpt, unchanged in what it keeps: the InfLLM v2 pieces
# (compressed_attention, calc_chunks_with_stride, CompressK, InfLLMv2CacheLayer, InfLLMv2Cache, the unpad
# helpers, and MiniCPMInfLLMv2Attention's __init__, get_compress_k and sparse_forward). Left out: RoPE, the
# dense attention classes, the decoder, the model classes, and the attention forward / unpadding methods
# (marked "[omitted: ...]" where they stood). Names the kept code uses but does not define (MiniCPMAttention,
# flash_attn's unpad helpers, the infllm_v2 kernels) are injected by the test (tests/test_infllm_v2_rev2.py).
#
# coding=utf-8
# Copyright 2025 The OpenBMB Team. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
""" PyTorch MiniCPM model."""
import os
import math
import re
import warnings
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import  nn
from transformers.cache_utils import Cache, DynamicCache

# Compatibility shim for older transformers (DynamicLayer / CacheLayerMixin not available)
try:
    from transformers.cache_utils import DynamicLayer, CacheLayerMixin
except ImportError:
    import torch.nn as nn
    DynamicLayer = nn.Module
    class CacheLayerMixin:
        pass
# [omitted: imports of transformers' masks, outputs, PreTrainedModel, docstring utilities]
from transformers.utils import (
    is_flash_attn_greater_or_equal_2_10,
    logging,
)

# [omitted: from .configuration_minicpm import MiniCPMConfig]

try:
    from flash_attn import flash_attn_func, flash_attn_varlen_func
    from flash_attn.bert_padding import index_first_axis, pad_input, unpad_input  # noqa
    from infllm_v2 import (
        infllmv2_attn_stage1,
        infllmv2_attn_varlen_func,
        infllmv2_attn_with_kvcache,
        max_pooling_1d,
        max_pooling_1d_varlen
    )
except:
    pass

from functools import lru_cache


def compressed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    k2: torch.Tensor,
    kernel_size: int,
    kernel_stride: int,
    block_size: int,
    topk: int,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    cu_seqlens_k2: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    sm_scale: float = None,
    init_blocks: int = 1,
    local_blocks: int = 2,
    cache_lens=None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        batch_size = cu_seqlens_q.shape[0] - 1
        
        # Check if it's prefilling stage
        is_prefilling = cache_lens is None or (cache_lens == 0).all().item()
        
        if is_prefilling:  # prefilling stage
            # Calculate q_idx for each query position in each batch
            cache_lens = torch.zeros(batch_size, dtype=torch.int32, device=q.device) 
            q_idx = torch.cat([
                (torch.arange(cu_seqlens_q[i + 1] - cu_seqlens_q[i], device=q.device) + 
                 max_seqlen_q - (cu_seqlens_q[i + 1] - cu_seqlens_q[i])) // block_size
                for i in range(batch_size)
            ], dim=0)  # shape: [total_q_len]
        else:  # decoding stage
            # Each batch has only one query (last position)
            q_idx = cache_lens // block_size  # shape: [batch_size] = [total_q_len] in decoding

        # 计算attention score
        score = infllmv2_attn_stage1(
            q.contiguous(),
            k.contiguous(),
            k2.contiguous(),
            cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k,
            cu_seqlens_v=cu_seqlens_k2,
            max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k,
            causal=is_prefilling
        )
        score = score[:, :q_idx.shape[0], :]  # [num_heads, total_q_len, num_blocks]
        
        block_score = max_pooling_1d_varlen(
            score.contiguous(),
            cu_seqlens_q,
            cu_seqlens_k,
            cache_lens,
            max_seqlen_q,
            max_seqlen_k,
            local_blocks=local_blocks,
            init_blocks=init_blocks,
            block_size=block_size,
            stride=kernel_stride
        )  # shape: [num_heads, total_q_len, num_blocks]
        

        # get topk
        topk = min(topk, block_score.shape[-1])
        topk_idx = block_score.topk(topk, dim=-1).indices.sort(-1).values
        topk_idx[topk_idx > q_idx[None, :, None]] = -1
        topk_idx = topk_idx.to(torch.int32)

    return topk_idx


@lru_cache(maxsize=16)
def calc_chunks_with_stride(cu_seqlen, chunk_size, kernel_stride):
    """
    Compute the chunks that require Sparse attention, with stride support.

    Args:
        cu_seqlen (torch.Tensor): Cumulative sequence lengths for each sample.
        chunk_size (int): Chunk size used for Sparse attention.
        kernel_stride (int): Stride size when sliding over the sequence.

    Returns:
        filtered_indices (torch.Tensor): Indices used to directly index into the key/value tensors.
        cu_seqlens_compressed (torch.Tensor): Cumulative sequence lengths after compression.
    """
    # 1. Compute the length of each sequence
    batch_sizes = cu_seqlen[1:] - cu_seqlen[:-1]

    # 2. Compute the start positions of chunks for each sequence (with stride)
    max_seq_len = torch.max(batch_sizes)
    max_num_chunks_per_seq = (max_seq_len - chunk_size) // kernel_stride + 1
    chunk_start_offsets = torch.arange(0, max_num_chunks_per_seq * kernel_stride, kernel_stride, device=cu_seqlen.device)
    seq_starts = cu_seqlen[:-1]
    chunk_start_in_seq = seq_starts[:, None] + chunk_start_offsets[None, :]  # [batch_size, max_num_chunks_per_seq]

    # 3. Filter out chunks that exceed sequence length or are smaller than the full chunk size
    chunk_end_in_seq = chunk_start_in_seq + chunk_size
    valid_chunk_mask = (chunk_end_in_seq <= (seq_starts[:, None] + batch_sizes[:, None]))

    # 4. Filter valid chunk start positions using the valid_chunk_mask
    valid_chunk_starts = chunk_start_in_seq[valid_chunk_mask]  # [num_valid_chunks]
    del chunk_start_in_seq
    # 5. Generate filtered_indices
    chunk_indices = torch.arange(
        0, chunk_size, device=cu_seqlen.device
    )[None, :]  # [1, chunk_size]
    filtered_indices = valid_chunk_starts[:, None] + chunk_indices  # [num_valid_chunks, chunk_size]
    filtered_indices = filtered_indices.view(-1)  # Flatten to 1D indices

    # 6. Compute compressed cumulative sequence lengths
    num_filtered_chunks_per_batch = valid_chunk_mask.sum(dim=1)  # Number of valid chunks per batch
    cu_seqlens_compressed = torch.zeros(
        len(cu_seqlen), dtype=torch.int32, device=cu_seqlen.device
    )
    cu_seqlens_compressed[1:] = num_filtered_chunks_per_batch.cumsum(dim=0)
    del num_filtered_chunks_per_batch, chunk_start_offsets, seq_starts, chunk_end_in_seq, valid_chunk_mask, chunk_indices
    return filtered_indices, cu_seqlens_compressed


class CompressK(torch.nn.Module):
    def __init__(self, head_num_k, head_dim, kernel_size, kernel_stride=16):
        """
        Module for compressing key (K) representations.

        Args:
            head_num_k (int): Number of key attention heads.
            head_dim (int): Dimension of each attention head.
            kernel_size (int): Size of each chunk used for compression.
            kernel_stride (int, optional): Stride used when dividing input into chunks. Default is 16.
        """
        super().__init__()
        self.kernel_size = kernel_size
        self.head_num_k = head_num_k
        self.head_dim = head_dim
        self.kernel_stride = kernel_stride

    def forward(self, k: torch.Tensor, cu_seqlens):
        """
        Forward pass for compressing the key (K) tensor.

        Args:
            k (torch.Tensor): Input key tensor of shape (total_seq_len, num_heads, head_dim).
            cu_seqlens (torch.Tensor): Cumulative sequence lengths for each sample in the batch, typically used for handling variable-length sequences.

        Returns:
            compress_k (torch.Tensor): Compressed key tensor.
            cu_seqlens_compressed (torch.Tensor): Updated cumulative sequence lengths after compression.

        """
        # Compute chunk-related metadata, with stride support
        filtered_k_indices, cu_seqlens_compressed = calc_chunks_with_stride(
            cu_seqlens, self.kernel_size, self.kernel_stride
        )

        # Extract filtered key vectors
        filtered_k = k.index_select(0, filtered_k_indices.view(-1))

        # split
        filtered_k = filtered_k.view(filtered_k.shape[0] // self.kernel_size, self.kernel_size, self.head_num_k, self.head_dim)  # [l, block_size,h,d]

        compressed_k = filtered_k.mean(dim=1)
        return compressed_k, cu_seqlens_compressed



class InfLLMv2CacheLayer(DynamicLayer):
    def __init__(self):
        super().__init__()
        # Initialize any additional attributes specific to InfLLMv2CacheLayer
        self.no_rope_keys = torch.tensor([], dtype=torch.float32)
        self.compress_k_cache = []
        self.no_compress_k_cache = []
        self.cached_compressed_cu_seqlens = torch.tensor([], dtype=torch.int32)
        self.compress_k_cache_varlen = torch.tensor([], dtype=torch.float32)
        # Add support for compress_k2
        self.compress_k2_cache = []
        self.cached_compressed_cu_seqlens2 = torch.tensor([], dtype=torch.int32)
        self.compress_k2_cache_varlen = torch.tensor([], dtype=torch.float32)
        self.no_compress_k2_cache = []

    def update_no_rope_key(self, key_states):
        if self.no_rope_keys.numel() == 0:
            self.no_rope_keys = key_states
        else:
            self.no_rope_keys = torch.cat([self.no_rope_keys, key_states], dim=1)
        return self.no_rope_keys

    def update_compress_k(self, key_states, cu_seqlens=None):
        if len(self.compress_k_cache) == 0:
            if cu_seqlens is not None:
                self.cached_compressed_cu_seqlens = cu_seqlens.clone()
            self.compress_k_cache_varlen = key_states
            split_sizes = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
            self.compress_k_cache = list(torch.split(key_states, split_sizes))
        else:
            for index, k in enumerate(key_states):
                if k is not None:
                    self.compress_k_cache[index] = torch.cat([self.compress_k_cache[index], k], dim=0)
            new_seq_lens = torch.tensor([tensor.shape[0] for tensor in self.compress_k_cache], dtype=torch.int32)
            new_cumsum = torch.cumsum(new_seq_lens, dim=0, dtype=torch.int32)
            
            self.compress_k_cache_varlen = torch.cat(self.compress_k_cache, dim=0)
            self.cached_compressed_cu_seqlens = torch.cat([torch.tensor([0], dtype=torch.int32), new_cumsum]).to(self.compress_k_cache_varlen.device)
        return self.compress_k_cache_varlen, self.cached_compressed_cu_seqlens

    def update_no_compress_k(self, key_states, kernel_size=32, kernel_stride=16):
        k_chunk_list = []
        for index, k in enumerate(key_states):
            if len(self.no_compress_k_cache) <= index:
                self.no_compress_k_cache.append(k)
            else:
                self.no_compress_k_cache[index] = torch.cat([self.no_compress_k_cache[index], k], dim=0)
                current_len = self.no_compress_k_cache[index].shape[0]
                if current_len >= kernel_size:
                    k_chunk_list.append(self.no_compress_k_cache[index][:kernel_size])
                    self.no_compress_k_cache[index] = self.no_compress_k_cache[index][kernel_stride:]
                else:
                    k_chunk_list.append(None)
        return k_chunk_list

    def update_compress_k2(self, key_states, cu_seqlens=None):
        if len(self.compress_k2_cache) == 0:
            if cu_seqlens is not None:
                self.cached_compressed_cu_seqlens2 = cu_seqlens.clone()
            self.compress_k2_cache_varlen = key_states
            split_sizes = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
            self.compress_k2_cache = list(torch.split(key_states, split_sizes))
        else:
            for index, k in enumerate(key_states):
                if k is not None:
                    self.compress_k2_cache[index] = torch.cat([self.compress_k2_cache[index], k], dim=0)
            new_seq_lens = torch.tensor([tensor.shape[0] for tensor in self.compress_k2_cache], dtype=torch.int32)
            new_cumsum = torch.cumsum(new_seq_lens, dim=0, dtype=torch.int32)
            
            self.compress_k2_cache_varlen = torch.cat(self.compress_k2_cache, dim=0)
            self.cached_compressed_cu_seqlens2 = torch.cat([torch.tensor([0], dtype=torch.int32), new_cumsum]).to(self.compress_k2_cache_varlen.device)
        return self.compress_k2_cache_varlen, self.cached_compressed_cu_seqlens2

    def update_no_compress_k2(self, key_states, kernel_size=128, kernel_stride=64):
        k_chunk_list = []
        for index, k in enumerate(key_states):
            if len(self.no_compress_k2_cache) <= index:
                self.no_compress_k2_cache.append(k)
            else:
                self.no_compress_k2_cache[index] = torch.cat([self.no_compress_k2_cache[index], k], dim=0)
                current_len = self.no_compress_k2_cache[index].shape[0]
                if current_len >= kernel_size:
                    k_chunk_list.append(self.no_compress_k2_cache[index][:kernel_size])
                    self.no_compress_k2_cache[index] = self.no_compress_k2_cache[index][kernel_stride:]
                else:
                    k_chunk_list.append(None)
        return k_chunk_list

class InfLLMv2Cache(DynamicCache):
    def __init__(self, config,num_hidden_layers: Optional[int] = None) -> None:
        super().__init__(config=config)
        self.layers = [InfLLMv2CacheLayer() for _ in range(num_hidden_layers)] if num_hidden_layers else []
        self._seen_tokens = 0
        

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        if layer_idx == 0:
            self._seen_tokens += key_states.shape[-2]
        return self.layers[layer_idx].update(key_states, value_states, cache_kwargs)

    def update_no_rope_key(self, key_states, layer_idx, cache_kwargs=None):
        return self.layers[layer_idx].update_no_rope_key(key_states)

    def update_compress_k(self, key_states, layer_idx, cu_seqlens=None, cache_kwargs=None):
        return self.layers[layer_idx].update_compress_k(key_states, cu_seqlens)

    def update_no_compress_k(self, key_states, layer_idx, kernel_size=32, kernel_stride=16, cache_kwargs=None):
        return self.layers[layer_idx].update_no_compress_k(key_states, kernel_size, kernel_stride)

    def update_compress_k2(self, key_states, layer_idx, cu_seqlens=None, cache_kwargs=None):
        return self.layers[layer_idx].update_compress_k2(key_states, cu_seqlens)

    def update_no_compress_k2(self, key_states, layer_idx, kernel_size=128, kernel_stride=64, cache_kwargs=None):
        return self.layers[layer_idx].update_no_compress_k2(key_states, kernel_size, kernel_stride)

    # [omitted: crop, batch_repeat_interleave, batch_select_indices]


logger = logging.get_logger(__name__)


def _get_unpad_data(attention_mask):
    seqlens_in_batch = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(attention_mask.flatten(), as_tuple=False).flatten()
    max_seqlen_in_batch = seqlens_in_batch.max().item()
    cu_seqlens = F.pad(torch.cumsum(seqlens_in_batch, dim=0, dtype=torch.torch.int32), (1, 0))
    return (
        indices,
        cu_seqlens,
        max_seqlen_in_batch,
    )


# [omitted: _get_unpad_data_packed, RMSNorm, the rotary embeddings, rotate_half, apply_rotary_pos_emb, MiniCPMMLP]

def _unpad_one_tensor(hidden_states, attention_mask):
    # Unpad the hidden states using the indices
    indices, cu_seqlens, max_seqlen_in_batch = _get_unpad_data(attention_mask)
    batch_size, seq_len = hidden_states.shape[:2]
    
    # Get the remaining dimensions
    remaining_dims = hidden_states.shape[2:]
    
    # Reshape to (batch_size * seq_len, *remaining_dims)
    reshaped_states = hidden_states.reshape(batch_size * seq_len, *remaining_dims)
    
    # Apply unpadding using indices
    unpadded_states = index_first_axis(reshaped_states, indices)
    
    return unpadded_states, indices, cu_seqlens, max_seqlen_in_batch

# [omitted: repeat_kv, MiniCPMAttention, MiniCPMFlashAttention2]


class MiniCPMInfLLMv2Attention(MiniCPMAttention):
    """
    MiniCPM flash attention module. This module inherits from `MiniCPMAttention` as the weights of the module stays
    untouched. The only required change would be on the forward pass where it needs to correctly call the public API of
    flash attention and deal with padding tokens in case the input contains any of them.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        assert self.config._attn_implementation == 'flash_attention_2', 'Only flash_attention_2 is supported for sparse attention'
        # TODO: Should be removed once Flash Attention for RoCm is bumped to 2.1.
        # flash_attn<2.1 generates top-left aligned causal mask, while what is needed here is bottom-right alignment, that was made default for flash_attn>=2.1. This attribute is used to handle this difference. Reference: https://github.com/Dao-AILab/flash-attention/releases/tag/v2.1.0.
        # Beware that with flash_attn<2.1, using q_seqlen != k_seqlen (except for the case q_seqlen == 1) produces a wrong mask (top-left).
        self._flash_attn_uses_top_left_mask = not is_flash_attn_greater_or_equal_2_10()

        #  -------sparse-------
        self.kernel_size = self.config.sparse_config.get('kernel_size', 32)
        self.kernel_stride = self.config.sparse_config.get('kernel_stride', 16)
        self.init_blocks = self.config.sparse_config.get('init_blocks', 1)
        self.block_size = self.config.sparse_config.get('block_size', 64)
        self.window_size = self.config.sparse_config.get('window_size', 2048)
        self.dense_len = self.config.sparse_config.get('dense_len', 8192)

        self.local_blocks = self.window_size // self.block_size  # local_blocks
        self.topk = self.config.sparse_config.get('topk', 64) + (self.window_size//self.block_size)
        self.use_nope = self.config.sparse_config.get('use_nope', False)
        
        self.compress_k = CompressK(self.num_key_value_heads, self.head_dim, kernel_size=self.kernel_size, kernel_stride=self.kernel_stride)
        self.compress_k2 = CompressK(self.num_key_value_heads, self.head_dim, kernel_size=self.kernel_size*4, kernel_stride=self.kernel_stride*4)

    # [omitted: forward, _sparse_attention_forward]

    def get_compress_k(self, key_states, attention_mask, past_key_value):
        """
        Get compressed key states and corresponding cumulative sequence lengths.
        
        Args:
            key_states: Key states tensor
            cu_seqlens_k: Cumulative sequence lengths for keys
            past_key_value: Past key-value cache
            no_rope_param: Optional parameter containing key states without rope
            
        Returns:
            Tuple of (compressed_k, compressed_cu_seqlens, compressed_k2, compressed_cu_seqlens2)
        """
        
        # Check if this is prefilling or initial compression condition

        is_prefilling = (
            key_states.shape[1] >= self.dense_len and
            (
                not past_key_value.layers[self.layer_idx].compress_k_cache
            )
        )
        
        if is_prefilling:
            unpadded_key_states, indices, cu_seqlens, max_seqlen_in_batch = _unpad_one_tensor(key_states,attention_mask=attention_mask)
            # Compress the keys
            compressed_k, compressed_cu_seqlens = self.compress_k(unpadded_key_states, cu_seqlens)
            compressed_k2, compressed_cu_seqlens2 = self.compress_k2(unpadded_key_states, cu_seqlens)
            
            past_key_value.update_compress_k(
                compressed_k, self.layer_idx, compressed_cu_seqlens)
            past_key_value.update_compress_k2(
                compressed_k2, self.layer_idx, compressed_cu_seqlens2)
            
            no_compress_k_list = []
            # Compute and update no_compress_k
            for i in range(len(compressed_cu_seqlens)-1):
                no_compress_k_start = (compressed_cu_seqlens[i+1]- compressed_cu_seqlens[i]) * self.kernel_stride
                
                no_compress_k_list.append(unpadded_key_states[cu_seqlens[i]+no_compress_k_start:cu_seqlens[i+1]].clone())

            past_key_value.update_no_compress_k(
                no_compress_k_list, self.layer_idx,kernel_stride=self.kernel_stride, 
                kernel_size=self.kernel_size)
            
            # Also update no_compress_k2
            no_compress_k2_list = []
            for i in range(len(compressed_cu_seqlens2)-1):
                no_compress_k2_start = (compressed_cu_seqlens2[i+1]- compressed_cu_seqlens2[i]) * self.kernel_stride * 4
                
                no_compress_k2_list.append(unpadded_key_states[cu_seqlens[i]+no_compress_k2_start:cu_seqlens[i+1]].clone())

            past_key_value.update_no_compress_k2(
                no_compress_k2_list, self.layer_idx,kernel_stride=self.kernel_stride*4, 
                kernel_size=self.kernel_size*4)
                
        else:
            # Decode case: incremental update
            batch_size = key_states.shape[0] # key_states.shape = [batch_size, seq, k_head_num, head_dim]
            key_states_split = list(torch.split(
                key_states[:,-1:].squeeze(1), #[batch_size, seq, k_head_num, head_dim]->[batch_size, 1, k_head_num, head_dim]-> [batch_size, k_head_num, head_dim]
                [1] * batch_size,dim=0,
            ))
            # Try to update no_compress_k buffer
            no_compress_k_list = past_key_value.update_no_compress_k(
                key_states_split, self.layer_idx, 
                kernel_stride=self.kernel_stride, 
                kernel_size=self.kernel_size)
            new_compressed_k_list = []
            for no_compress_k in no_compress_k_list:

                if no_compress_k is not None:
                    # We have enough tokens to compress
                    new_compressed_k = no_compress_k.mean(dim=0, keepdim=True)  # [1, n_heads_k, head_dim]
                    
                    new_compressed_k_list.append(new_compressed_k)
                else:
                    new_compressed_k_list.append(None)
            compressed_k, compressed_cu_seqlens = past_key_value.update_compress_k(new_compressed_k_list, self.layer_idx,)
            
            # For compress_k2, update no_compress_k2 buffer and compress when ready
            no_compress_k2_list = past_key_value.update_no_compress_k2(
                key_states_split, self.layer_idx, 
                kernel_stride=self.kernel_stride*4, 
                kernel_size=self.kernel_size*4)
            new_compressed_k2_list = []
            for no_compress_k2 in no_compress_k2_list:
                if no_compress_k2 is not None:
                    # We have enough tokens to compress for k2
                    new_compressed_k2 = no_compress_k2.mean(dim=0, keepdim=True)  # [1, n_heads_k, head_dim]
                    new_compressed_k2_list.append(new_compressed_k2)
                else:
                    new_compressed_k2_list.append(None)
            compressed_k2, compressed_cu_seqlens2 = past_key_value.update_compress_k2(new_compressed_k2_list, self.layer_idx,)
        
        return compressed_k, compressed_cu_seqlens, compressed_k2, compressed_cu_seqlens2
    def sparse_forward(self,
                       query_layer,
                       key_layer,
                       value_layer,
                       cu_seqlens_q,
                       cu_seqlens_k,
                       max_seqlen_in_batch_q,
                       max_seqlen_in_batch_k,
                       no_rope_param=None,
                       compressed_k=None, compressed_cu_seqlens=None,
                       compressed_k2=None, compressed_cu_seqlens2=None):
        compressed_seqlens = compressed_cu_seqlens[1:] - compressed_cu_seqlens[:-1]
        cache_lens = None
        if max_seqlen_in_batch_q==1 and max_seqlen_in_batch_k>1: #decoding
            seq_lens_k =  cu_seqlens_k[1:] - cu_seqlens_k[:-1]
            cache_lens = seq_lens_k-1

        topk_idx = compressed_attention(
            query_layer if no_rope_param is None else no_rope_param['query_states_no_rope'],
            compressed_k,
            compressed_k2,
            self.kernel_size,
            self.kernel_stride,
            self.block_size,
            self.topk,
            cu_seqlens_q,
            compressed_cu_seqlens,
            compressed_cu_seqlens2,
            max_seqlen_in_batch_q,
            compressed_seqlens.max().item(),
            None,
            init_blocks=self.init_blocks,
            local_blocks=self.local_blocks,
            cache_lens=cache_lens
        )
        topk_attn_output = infllmv2_attn_varlen_func(
            query_layer,
            key_layer,
            value_layer,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_in_batch_q,
            max_seqlen_in_batch_k,
            dropout_p=0.0,
            deterministic=False,
            softmax_scale=None,
            causal=max_seqlen_in_batch_q != 1,
            return_attn_probs=False,
            # block_window_size=self.window_size // self.block_size,
            topk_idx=topk_idx
        )

        return topk_attn_output

    # [omitted: _flash_attention_forward_dense, _upad_input, and the rest of the file]
