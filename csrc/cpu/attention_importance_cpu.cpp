// CPU implementation of refreekv::attention_importance.
//
// Work is split over (batch, kv head) pairs: a job owns a GQA group, so each
// key row it reads serves all the group's query heads. Models with few KV
// heads also cut each group's window rows into chunks, each with an
// accumulator of its own, summed at the end. Inside a job the window rows
// are taken in blocks whose logits fit a fixed budget; each block holds its
// rows' complete visible logit rows, so the row's log-sum-exp is exact
// before any probability is formed, and the w x n probability matrix never
// exists.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../checks.h"

namespace refreekv {
namespace {

// Logit elements one worker holds at a time (4 MiB of float32); the block of
// probabilities is the same size. This bounds the extra memory per thread
// independently of the window, as the operator's contract requires.
constexpr int64_t kBlockElements = int64_t{1} << 20;

// Whole window positions per block (all g heads of a position together), so
// a block's rows share a narrow causal range and one key read serves g heads.
int64_t positions_per_block(const ImportanceParams& p, int64_t rows) {
  return std::clamp<int64_t>(kBlockElements / (p.keys * p.group), 1, rows);
}

// Accumulates, for the query heads of one GQA group, the causal softmax
// probabilities of the window rows [row_begin, row_end) onto the keys:
// acc[h, j] += p_h[i, j].
//
// query_group: [group, window, head_dim] in the input dtype.
// softcap:     > 0 caps each logit to softcap * tanh(logit / softcap); 0 not.
// key_head:    [keys, head_dim] float32.
// key_padding: [keys] bool (true = padding) or undefined.
// first_valid: the first non-padding key; rows before it see nothing.
// group_sinks: [group] float32 sink logits of the group's heads, or undefined.
// acc:         [group, keys] float32, zero-initialised by the caller.
// scratch:     [2, >= block_elements(p, row_end - row_begin)] float32, this
//              thread's logits and probabilities buffers.
void accumulate_group(const ImportanceParams& p, const at::Tensor& query_group,
                      double scale, double softcap, const at::Tensor& key_head,
                      const at::Tensor& key_padding, int64_t first_valid,
                      const at::Tensor& group_sinks, int64_t row_begin,
                      int64_t row_end, const at::Tensor& scratch, at::Tensor& acc) {
  const int64_t g = p.group;
  const int64_t n = p.keys;
  const int64_t w = p.window;
  const int64_t first_pos = n - w;  // absolute position of window row 0
  const int64_t block_positions = positions_per_block(p, row_end - row_begin);
  const at::Tensor logits_buffer = scratch[0];
  const at::Tensor probs_buffer = scratch[1];
  const float neg_inf = -std::numeric_limits<float>::infinity();

  for (int64_t i0 = row_begin; i0 < row_end; i0 += block_positions) {
    const int64_t i1 = std::min(row_end, i0 + block_positions);
    const int64_t positions = i1 - i0;
    const int64_t rows = positions * g;
    const int64_t visible = first_pos + i1;  // keys seen by the last row

    // Rows ordered (position, head), in a float32 copy of the block.
    at::Tensor q_block = at::empty({positions, g, p.head_dim}, acc.options());
    q_block.copy_(query_group.narrow(1, i0, positions).transpose(0, 1));
    at::Tensor logits =
        logits_buffer.narrow(0, 0, rows * visible).view({rows, visible});
    // logits = scale * q k^T, with the scale applied inside the GEMM (beta = 0
    // ignores the output's old contents).
    at::addmm_out(logits, logits, q_block.view({rows, p.head_dim}),
                  key_head.narrow(0, 0, visible).t(), /*beta=*/0, /*alpha=*/scale);
    if (softcap > 0.0) {
      // Gemma 2's order: scaled, then capped, then masked (so masked keys
      // stay at -inf). Dividing after the scaling rather than folding
      // 1 / softcap into the GEMM's alpha cannot overflow that alpha.
      logits.div_(softcap).tanh_().mul_(softcap);
    }

    // Causal mask: only the keys after the block's first position can be
    // ahead of some of its rows.
    const int64_t ahead_start = first_pos + i0 + 1;
    if (visible > ahead_start) {
      at::Tensor key_pos = at::arange(ahead_start, visible, at::kLong);
      at::Tensor row_pos = at::arange(first_pos + i0, first_pos + i1, at::kLong);
      at::Tensor ahead = key_pos.unsqueeze(0).gt(row_pos.unsqueeze(1));
      logits.view({positions, g, visible})
          .narrow(2, ahead_start, visible - ahead_start)
          .masked_fill_(ahead.unsqueeze(1), neg_inf);
    }
    if (key_padding.defined()) {
      logits.masked_fill_(key_padding.narrow(0, 0, visible), neg_inf);
    }

    at::Tensor probs =
        probs_buffer.narrow(0, 0, rows * visible).view({rows, visible});
    if (group_sinks.defined()) {
      // A softmax whose normalizer has one more term, exp(sink). The finite
      // sink also joins the row maximum, so the maximum is finite even in a
      // row that sees only padding: its probabilities are exp(-inf) = 0 with
      // no special case, and every denominator is at least 1.
      const at::Tensor logits_3d = logits.view({positions, g, visible});
      at::Tensor probs_3d = probs.view({positions, g, visible});
      const at::Tensor row_sinks = group_sinks.view({1, g, 1});
      const at::Tensor row_max =
          at::maximum(logits_3d.amax({2}, /*keepdim=*/true), row_sinks);
      at::sub_out(probs_3d, logits_3d, row_max).exp_();
      probs_3d.div_(probs_3d.sum({2}, /*keepdim=*/true)
                        .add_((row_sinks - row_max).exp_()));
    } else {
      at::_softmax_out(probs, logits, /*dim=*/1, /*half_to_float=*/false);
      // A row placed before the first real token sees only padding; its
      // softmax is 0/0, and it contributes nothing.
      const int64_t blind_positions =
          std::clamp<int64_t>(first_valid - (first_pos + i0), 0, positions);
      if (blind_positions > 0) {
        probs.narrow(0, 0, blind_positions * g).zero_();
      }
    }
    acc.narrow(1, 0, visible).add_(probs.view({positions, g, visible}).sum(0));
  }
}

// Row chunks per GQA group. With few KV heads, one job per head leaves
// threads idle: on 2 threads, 3 KV heads, n = 4096, w = 64, one job per head
// took 7.9 ms and three chunks per head 3.8 ms (timed alternately in one
// process). The count depends on the shapes alone, never on the batch or the
// thread count, so a sequence gets the same sums alone and in a batch; at
// least kMinChunkRows rows per chunk keep the per-chunk costs (the key head
// read and converted, the accumulator) small next to the chunk's GEMM.
constexpr int64_t kTargetJobsPerSequence = 8;
constexpr int64_t kMaxChunks = 4;
constexpr int64_t kMinChunkRows = 16;

// out_row [n] = the mean or the max over a group's [g, n] accumulator.
void reduce_group(GroupReduce reduce, const at::Tensor& acc, at::Tensor out_row) {
  if (reduce == GroupReduce::kMean) {
    at::mean_out(out_row, acc, {0});
  } else {
    at::amax_out(out_row, acc, {0});
  }
}

int64_t row_chunks(const ImportanceParams& p) {
  const int64_t wanted = (kTargetJobsPerSequence + p.kv_heads - 1) / p.kv_heads;
  return std::max<int64_t>(1, std::min({wanted, kMaxChunks, p.window / kMinChunkRows}));
}

// The first window row of each chunk (and w at the end), placed so that the
// chunks hold equal causal work. Rows [0, r) see sum_{i<r} (a + i + 1) keys
// with a = n - w, about a r + r^2 / 2; equal rows would give the last chunk
// most of the work when w is close to n (H2O over every query).
std::vector<int64_t> chunk_starts(const ImportanceParams& p, int64_t chunks) {
  const double a = static_cast<double>(p.keys - p.window);
  const double w = static_cast<double>(p.window);
  const double total = a * w + 0.5 * w * w;
  std::vector<int64_t> starts(chunks + 1);
  starts[0] = 0;
  starts[chunks] = p.window;
  for (int64_t c = 1; c < chunks; ++c) {
    const double work = total * static_cast<double>(c) / static_cast<double>(chunks);
    const int64_t row = std::llround(-a + std::sqrt(a * a + 2.0 * work));
    starts[c] = std::clamp<int64_t>(row, starts[c - 1] + 1, p.window - (chunks - c));
  }
  return starts;
}

at::Tensor attention_importance_cpu(const at::Tensor& query, const at::Tensor& key,
                                    double scale,
                                    const std::optional<at::Tensor>& kv_valid,
                                    bool normalize,
                                    c10::string_view group_reduce, double softcap,
                                    const std::optional<at::Tensor>& sinks) {
  const ImportanceParams p = check_importance_inputs(query, key, scale, kv_valid,
                                                     group_reduce, softcap, sinks);
  const at::Tensor sinks_f32 =
      sinks.has_value() ? float_sinks_on_host(*sinks) : at::Tensor();
  const at::Tensor q = query.contiguous();
  const at::Tensor k = key.contiguous();
  const auto float_opts = query.options().dtype(at::kFloat);
  const int64_t out_heads = p.reduce == GroupReduce::kNone ? p.heads : p.kv_heads;
  at::Tensor out = at::zeros({p.batch, out_heads, p.keys}, float_opts);

  at::Tensor key_padding;  // [b, n], true where the key is padding
  at::Tensor first_valid;  // [b], index of the first real key (n if none)
  at::Tensor has_padding;  // [b] bool: a sequence without padding skips the mask
  if (kv_valid.has_value()) {
    const at::Tensor valid = kv_valid->contiguous();
    key_padding = valid.logical_not();
    first_valid = at::where(valid.any(1), valid.to(at::kByte).argmax(1),
                            at::scalar_tensor(p.keys, at::kLong))
                      .contiguous();
    has_padding = key_padding.any(1).contiguous();
  }

  const int64_t chunks = row_chunks(p);
  const std::vector<int64_t> starts = chunk_starts(p, chunks);
  const int64_t groups = p.batch * p.kv_heads;
  // With one chunk a job finishes its group: it accumulates into the output
  // rows themselves, or into a [g, n] buffer that it reduces. With more,
  // every chunk accumulates into its own slice of `partial`, summed after.
  at::Tensor partial =
      chunks == 1 ? at::Tensor() : at::zeros({groups, chunks, p.group, p.keys}, float_opts);
  // Logits and probabilities buffers, one pair per thread for the whole call:
  // allocated per job, they were page-faulted in afresh time and again (a
  // third of H2O's scoring time over every query at n = 4096, measured).
  int64_t largest_chunk = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    largest_chunk = std::max(largest_chunk, starts[c + 1] - starts[c]);
  }
  const int64_t threads = at::get_num_threads();
  const at::Tensor scratch = at::empty(
      {threads, 2, positions_per_block(p, largest_chunk) * p.group * p.keys}, float_opts);

  // The jobs call ATen operators on OpenMP worker threads, which do not
  // inherit this thread's thread-local state: a caller under no_grad with
  // inputs that require grad (a model's queries and keys) would see them
  // refuse out= arguments in grad mode.
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, groups * chunks, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    for (int64_t job = begin; job < end; ++job) {
      const int64_t group_index = job / chunks;
      const int64_t chunk = job % chunks;
      const int64_t b = group_index / p.kv_heads;
      const int64_t kv_head = group_index % p.kv_heads;
      const at::Tensor key_head = k[b][kv_head].to(at::kFloat);
      const at::Tensor query_group = q[b].narrow(0, kv_head * p.group, p.group);
      at::Tensor acc;
      if (chunks > 1) {
        acc = partial[group_index][chunk];
      } else if (p.reduce == GroupReduce::kNone) {
        acc = out[b].narrow(0, kv_head * p.group, p.group);
      } else {
        acc = at::zeros({p.group, p.keys}, float_opts);
      }
      const bool padded = has_padding.defined() && has_padding.data_ptr<bool>()[b];
      accumulate_group(
          p, query_group, scale, softcap, key_head,
          padded ? key_padding[b] : at::Tensor(),
          first_valid.defined() ? first_valid.data_ptr<int64_t>()[b] : 0,
          sinks_f32.defined() ? sinks_f32.narrow(0, kv_head * p.group, p.group)
                              : at::Tensor(),
          starts[chunk], starts[chunk + 1], scratch[at::get_thread_num() % threads], acc);
      if (chunks == 1 && p.reduce != GroupReduce::kNone) {
        reduce_group(p.reduce, acc, out[b][kv_head]);
      }
    }
  });

  if (chunks > 1) {
    at::Tensor per_group = out.view({groups, -1, p.keys});  // [groups, g or 1, n]
    if (p.reduce == GroupReduce::kNone) {
      at::sum_out(per_group, partial, {1});
    } else {
      const at::Tensor summed = partial.sum(1);  // [groups, g, n]
      for (int64_t group_index = 0; group_index < groups; ++group_index) {
        reduce_group(p.reduce, summed[group_index], per_group[group_index][0]);
      }
    }
  }

  if (normalize) {
    // Key j is seen by the window rows at positions >= j: min(w, n - j).
    out.div_(at::arange(p.keys, 0, -1, float_opts).clamp_max_(p.window));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(refreekv, CPU, m) {
  m.impl("attention_importance", &attention_importance_cpu);
}

}  // namespace refreekv
