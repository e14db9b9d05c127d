// CPU implementation of refreekv::attention_importance.
//
// Work is split over (batch, kv head) pairs: one job owns a GQA group, so
// every key row is read once for the group's query heads. When there are too
// few groups to keep every thread busy, each group's window rows are also cut
// into chunks with accumulators of their own, summed at the end. Inside a job
// the window rows are taken in blocks whose logits fit a fixed budget; each
// block holds its rows' complete visible logit rows, so the row's log-sum-exp
// is exact before any probability is formed, and the w x n probability
// matrix never exists.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../checks.h"

namespace refreekv {
namespace {

// Logit elements one worker holds at a time (4 MiB of float32); the block of
// probabilities is the same size. This bounds the extra memory per thread
// independently of the window, as the operator's contract requires.
constexpr int64_t kBlockElements = int64_t{1} << 20;

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
void accumulate_group(const ImportanceParams& p, const at::Tensor& query_group,
                      double scale, double softcap, const at::Tensor& key_head,
                      const at::Tensor& key_padding, int64_t first_valid,
                      const at::Tensor& group_sinks, int64_t row_begin,
                      int64_t row_end, at::Tensor& acc) {
  const int64_t g = p.group;
  const int64_t n = p.keys;
  const int64_t w = p.window;
  const int64_t first_pos = n - w;  // absolute position of window row 0
  // Whole window positions per block (all g heads of a position together),
  // so a block's rows share a narrow causal range and one key read serves g
  // heads.
  const int64_t block_positions =
      std::clamp<int64_t>(kBlockElements / (n * g), 1, row_end - row_begin);
  const auto float_opts = acc.options();
  at::Tensor logits_buffer = at::empty({block_positions * g * n}, float_opts);
  at::Tensor probs_buffer = at::empty({block_positions * g * n}, float_opts);
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

  // Chunks per group depend on the KV heads and the thread count only, not
  // on the batch, so a sequence's sums are the same alone and in a batch.
  // At most kMaxChunks keeps the accumulators within O(b H n).
  constexpr int64_t kMaxChunks = 4;
  const int64_t threads = at::get_num_threads();
  // Measured on 2 threads, 3 KV heads, w = 64: 7.9 ms with one chunk, 4.4
  // with two, 3.8 with three (n = 4096); jobs of about a third of a thread's
  // share balance well.
  const int64_t chunks =
      p.kv_heads >= 4 * threads
          ? 1
          : std::min({p.window, kMaxChunks, (4 * threads + p.kv_heads - 1) / p.kv_heads});
  const int64_t groups = p.batch * p.kv_heads;
  // [groups, chunks, group, n] accumulators; with one chunk the output rows
  // themselves when nothing is reduced.
  const bool direct = chunks == 1 && p.reduce == GroupReduce::kNone;
  at::Tensor partial =
      direct ? at::Tensor() : at::zeros({groups, chunks, p.group, p.keys}, float_opts);

  at::parallel_for(0, groups * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t group_index = job / chunks;
      const int64_t chunk = job % chunks;
      const int64_t b = group_index / p.kv_heads;
      const int64_t kv_head = group_index % p.kv_heads;
      const at::Tensor key_head = k[b][kv_head].to(at::kFloat);
      const at::Tensor query_group = q[b].narrow(0, kv_head * p.group, p.group);
      at::Tensor acc = direct ? out[b].narrow(0, kv_head * p.group, p.group)
                              : partial[group_index][chunk];
      const bool padded = has_padding.defined() && has_padding.data_ptr<bool>()[b];
      accumulate_group(
          p, query_group, scale, softcap, key_head,
          padded ? key_padding[b] : at::Tensor(),
          first_valid.defined() ? first_valid.data_ptr<int64_t>()[b] : 0,
          sinks_f32.defined() ? sinks_f32.narrow(0, kv_head * p.group, p.group)
                              : at::Tensor(),
          chunk * p.window / chunks, (chunk + 1) * p.window / chunks, acc);
    }
  });

  if (!direct) {
    const at::Tensor summed = partial.sum(1);  // [groups, group, n]
    const at::Tensor per_sequence = summed.view({p.batch, p.kv_heads, p.group, p.keys});
    if (p.reduce == GroupReduce::kNone) {
      out.copy_(per_sequence.view({p.batch, p.heads, p.keys}));
    } else if (p.reduce == GroupReduce::kMean) {
      at::mean_out(out, per_sequence, {2});
    } else {
      at::amax_out(out, per_sequence, {2});
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
