// Paged attention on the CPU for the rollout engine's packed forward (decodes and prefill chunks together).
//
// Legend: L packed query rows, Hq query heads, Hkv key/value heads (Hq % Hkv == 0), D head dim,
// BS rows per KV block, NB blocks, C chunks (one per scheduled sequence).
//
// Chunk c owns query rows [q_start[c], q_start[c] + q_len[c]) of the packed query; they are the LAST q_len[c]
// rows of a sequence whose keys are rows [0, ctx_len[c]) of its KV, stored block by block:
// key row p lives in block tables[table_off[c] + p / BS], row p % BS. Query row i of the chunk sees key rows
// p <= ctx_len[c] - q_len[c] + i (causal). The kernel reads the blocks where they are (no gather, no
// padding to the longest sequence), which is what makes batched decoding of sequences of different lengths
// cheap: the torch path it replaces copied every sequence's K/V into a padded tensor per layer per step.
//
// Layouts (kv_cache.PagedKVPool, layout "k_transposed"):
//   K storage (NB, Hkv, D, BS): TRANSPOSED within each block, so the BS scores of one query vector against a
//     block are D broadcast-FMAs over contiguous BS-wide rows (no horizontal reductions).
//   V storage (NB, BS, Hkv, D): the weighted sum runs over contiguous D-wide rows.
#pragma once
#include <cstdint>

namespace vcf {

struct PagedAttentionArgs {
  int64_t q_row_stride, q_head_stride;   // query element (row, head, d) at q[row * rs + head * hs + d]
  int num_q_heads, num_kv_heads, head_dim, block_size;
  int num_chunks;
  const int64_t* q_start;
  const int64_t* q_len;
  const int64_t* ctx_len;
  const int64_t* table_off;
  const int32_t* tables;
  double scale;                          // softmax scale (1/sqrt(D) for Qwen2.5-VL)
};

// out: (L, Hq, D) contiguous; k_pool: (NB, Hkv, D, BS) contiguous; v_pool: (NB, BS, Hkv, D) contiguous.
void paged_attention_cpu(const PagedAttentionArgs& a, const float* q, const float* k_pool, const float* v_pool,
                         float* out);
void paged_attention_cpu(const PagedAttentionArgs& a, const double* q, const double* k_pool, const double* v_pool,
                         double* out);

}  // namespace vcf
