# Vendored read-only from github.com/OpenBMB/infllmv2_cuda_impl, tests/utils.py at commit f908e7316da706ed36c3dcfaaec6489ba4c03007: an excerpt,
# unchanged: its imports (lines 1-6) and the reference functions convert_topk_to_base_blockmask (lines
# 224-260), construct_local_mask (772-799), prepare_mixed_mask (1027-1085), attention_blocksparse_ref
# (1133-1195). The rest of that file (plotting, logging, generators) is left out. License: Apache-2.0
# (that repository's README.md, section License).
# Adapted from https://github.com/Dao-AILab/flash-attention/blob/main/tests/test_flash_attn.py

import math
import torch
import torch.nn.functional as F
from einops import rearrange, repeat

def convert_topk_to_base_blockmask(
    topk_idx: torch.Tensor,
    max_seqlen_k: int,
    block_size: int,
    device: str = "cuda"
) -> torch.Tensor:
    """
    Convert topk indices to infllmv2_sparse_attention mask
    
    Args:
        topk_idx: Tensor of shape [num_heads, total_seqlen, k] containing block indices
        max_seqlen_k: Maximum sequence length for keys
        block_size: Size of each block
        device: Output device
    
    Returns:
        mask: Boolean mask of shape [num_heads, total_seqlen, k_blocks]
    """
    # Calculate number of key blocks
    k_blocks = (max_seqlen_k + block_size - 1) // block_size
    num_heads, total_seqlen, k = topk_idx.shape

    # Initialize all-False mask
    mask = torch.zeros(num_heads, total_seqlen, k_blocks, 
                       dtype=torch.bool, device=device)

    # Filter out any -1 values (if present)
    valid_mask = topk_idx != -1
    
    # Generate index mask - get head, seq positions and corresponding indices
    batch_idx, seq_idx, k_idx = torch.where(valid_mask)
    block_idx = topk_idx[valid_mask]
    
    # Set corresponding positions to True
    mask[batch_idx, seq_idx, block_idx] = True

    return mask

def construct_local_mask(
    seqlen_q,
    seqlen_k,
    window_size=(-1, -1),  # -1 means infinite window size
    query_padding_mask=None,
    key_padding_mask=None,
    device=None,
):
    row_idx = rearrange(torch.arange(seqlen_q, device=device, dtype=torch.long), "s -> s 1")
    col_idx = torch.arange(seqlen_k, device=device, dtype=torch.long)
    sk = (
        seqlen_k
        if key_padding_mask is None
        else rearrange(key_padding_mask.sum(-1), "b -> b 1 1 1")
    )
    sq = (
        seqlen_q
        if query_padding_mask is None
        else rearrange(query_padding_mask.sum(-1), "b -> b 1 1 1")
    )
    if window_size[0] < 0:
        return col_idx > row_idx + sk - sq + window_size[1]
    else:
        sk = torch.full_like(col_idx, seqlen_k) if key_padding_mask is None else sk
        return torch.logical_or(
            col_idx > torch.minimum(row_idx + sk - sq + window_size[1], sk),
            col_idx < row_idx + sk - sq - window_size[0],
        )

def prepare_mixed_mask(base_blockmask, cu_seqlens_q, cu_seqlens_k, seqlen_q, seqlen_k, batch_size, nheads = 32, nheads_k= 2, m_block_dim=128, n_block_dim=128):
    """
    Expand a block-level sparsity mask to a token-level mask for attention_blocksparse_ref,
    handling variable sequence lengths per batch item.
    
    Parameters:
        base_blockmask: Bool tensor of shape [nheads_k, total_unpadded_tokens, ncol] 
            where True values indicate blocks that should be attended to
        cu_seqlens_q: Cumulative sequence lengths for queries [batch_size + 1]
        cu_seqlens_k: Cumulative sequence lengths for keys [batch_size + 1]
        seqlen_q: Maximum query sequence length (padded)
        seqlen_k: Maximum key sequence length (padded)
        batch_size: Number of batches
        m_block_dim: Block size for query dimension (default: 128)
        n_block_dim: Block size for key dimension (default: 128)

    
    Returns:
        mixed_mask: Bool tensor of shape [batch_size, num_heads, seqlen_q, seqlen_k]
            where True values indicate positions that should be masked out
    """
    # Make a copy of base_blockmask to avoid modifying the original
    modified_blockmask = base_blockmask.clone()
    
    # Helper function to round up to multiple
    def round_to_multiple(x, base):
        return ((x + base - 1) // base) * base
    

    
    # Expand blocks to token level for all heads
    expanded_mask = repeat(modified_blockmask, "h r c -> (h g) r (c n)", 
                         g = int(nheads / nheads_k), n=n_block_dim)
    # breakpoint()
    # Create batch of masks with padding
    batch_masks = []
    for b in range(batch_size):
        # Get actual sequence lengths and start/end indices for this batch item
        q_start, q_end = cu_seqlens_q[b].item(), cu_seqlens_q[b+1].item()
        k_start, k_end = cu_seqlens_k[b].item(), cu_seqlens_k[b+1].item()
        q_len = q_end - q_start
        k_len = k_end - k_start
        
        # Create padded mask for this batch item
        # Initialize with all masked out (True)
        batch_mask = torch.ones(nheads, seqlen_q, seqlen_k, dtype=torch.bool, 
                               device=base_blockmask.device)
        
        # Copy the relevant portion from expanded mask corresponding to THIS batch item
        # We need to use the correct slice from the unpadded tokens
        # And invert since True in expanded_mask means "attend to"
        # but True in final mask means "mask out" (set to -inf)
        batch_mask[:, :q_len, :k_len] = ~expanded_mask[:, q_start:q_end, :k_len]

        batch_masks.append(batch_mask)
    
    # Stack all batch masks
    mixed_mask = torch.stack(batch_masks, dim=0)
    return mixed_mask

def attention_blocksparse_ref(
    q, k, v, 
    mixed_mask,
    query_padding_mask=None,
    key_padding_mask=None, 
    p_dropout=0.0, 
    dropout_mask=None,
    causal=False,
    window_size=(-1, -1),
    upcast=True,
    reorder_ops=False,
    ):
    # q, k, v = qkv.float().unbind(dim=2)
    if causal:
        window_size = (window_size[0], 0)
    dtype_og = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    k = repeat(k, "b s h d -> b s (h g) d", g=q.shape[2] // k.shape[2])
    v = repeat(v, "b s h d -> b s (h g) d", g=q.shape[2] // v.shape[2])
    d = q.shape[-1]
    if not reorder_ops:
        scores = torch.einsum("bthd,bshd->bhts", q / math.sqrt(d), k)
    else:
        scores = torch.einsum("bthd,bshd->bhts", q, k / math.sqrt(d))
    if key_padding_mask is not None:
        scores.masked_fill_(rearrange(~key_padding_mask, "b s -> b 1 1 s"), float("-inf"))
    # local mask
    if window_size[0] >= 0 or window_size[1] >= 0:
        local_mask = construct_local_mask(
            seqlen_q,
            seqlen_k,
            window_size,
            query_padding_mask,
            key_padding_mask,
            q.device,
        )
        scores.masked_fill_(local_mask, float("-inf"))
        
    
    scores.masked_fill_(rearrange(mixed_mask, "b h t s -> b h t s"), float("-inf"))
    
    # print("processed blockmask: ", rearrange(~base_blockmask, "h t s -> 1 h t s"))
    
    attention = torch.softmax(scores, dim=-1).to(v.dtype)
     
    if window_size[0] >= 0 or window_size[1] >= 0:
        attention = attention.masked_fill(torch.all(torch.bitwise_or(local_mask, rearrange(mixed_mask, "b h t s -> b h t s")), dim=-1, keepdim=True), 0.0)
    
    attention = attention.masked_fill(rearrange(mixed_mask, "b h t s -> b h t s"), 0.0)  
    
    if query_padding_mask is not None:
        attention = attention.masked_fill(rearrange(~query_padding_mask, "b s -> b 1 s 1"), 0.0)
    dropout_scaling = 1.0 / (1 - p_dropout)
    if dropout_mask is not None:
        attention_drop = attention.masked_fill(~dropout_mask, 0.0)
    else:
        attention_drop = attention
    output = torch.einsum("bhts,bshd->bthd", attention_drop, v * dropout_scaling)
    if query_padding_mask is not None:
        output.masked_fill_(rearrange(~query_padding_mask, "b s -> b s 1 1"), 0.0)
    return output.to(dtype=dtype_og), attention.to(dtype=dtype_og)
