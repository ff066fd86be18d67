// actprune::stash_layer's common case in C++: copy a decoder layer's taps and the residual stream
// leaving it into the step buffers (server/ops.py says what each buffer holds and why).
//
// Why C++: the op runs once per decoder layer per step. Its Python body cost ~100 us a call in a
// serving worker whose caches the weights have just flushed, ~2.8 ms of a 74 ms batch-8 step on the
// benchmark model, most of the capture's cost (BENCHMARKS.md, issue 16). Here a call is the
// dispatcher's argument parsing and a few ATen copies.
//
// What stays in Python (the op "stash_layer_slow", same schema, called through the dispatcher):
// a step too long for the buffers (it folds each tap where it is, with the compiled fold) and a
// phase whose buffers this registry does not hold. Both are rare; the Python op is the reference.
//
// The registry maps the address of a StepBuffers' phase tensor to the buffers the copies write;
// Python registers a StepBuffers when it is made and forgets it when the last one with that phase
// is gone (ops.py). Tensors are held by reference count, so a registered buffer cannot be freed
// while its address is a key.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cstdint>
#include <mutex>
#include <optional>
#include <type_traits>
#include <unordered_map>

namespace {

struct Buffers {
  at::Tensor chan;     // (N, sum C) float32: pending rows of the channel taps
  at::Tensor stream;   // (N, L + 1, H) float32: the residual stream at each layer boundary
  at::Tensor routers;  // (N, R, E') float32: router logits of the MoE layers
  at::Tensor cursor;   // (1,) int64 on the CPU: rows pending; undefined: none wait (a GPU)
};

std::mutex registry_mutex;  // registrations come from Python, possibly another thread
std::unordered_map<std::uintptr_t, Buffers> registry;

void register_buffers(const at::Tensor& phase, const at::Tensor& chan, const at::Tensor& stream,
                      const at::Tensor& routers, const std::optional<at::Tensor>& cursor) {
  TORCH_CHECK(chan.dim() == 2 && stream.dim() == 3 && routers.dim() == 3, "actprune: step buffers of the wrong rank");
  TORCH_CHECK(!cursor.has_value() || (cursor->device().is_cpu() && cursor->scalar_type() == at::kLong),
              "actprune: the row cursor must be a CPU int64 tensor");
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry[reinterpret_cast<std::uintptr_t>(phase.data_ptr())] =
      Buffers{chan, stream, routers, cursor.has_value() ? *cursor : at::Tensor()};
}

void forget_buffers(const at::Tensor& phase) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  registry.erase(reinterpret_cast<std::uintptr_t>(phase.data_ptr()));
}

bool find_buffers(const at::Tensor& phase, Buffers& out) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  auto it = registry.find(reinterpret_cast<std::uintptr_t>(phase.data_ptr()));
  if (it == registry.end()) return false;
  out = it->second;
  return true;
}

// One (T, C) source into float32 rows of a step buffer: the raw loop of a CPU. ATen's copy_ costs
// ~3 us a call at these sizes (dispatch, TensorIterator set-up) for ~1 us of bytes, and a layer makes
// four; a loop over T rows costs the bytes. dst: T rows dst_stride floats apart, C contiguous each.
template <typename S>
void copy_rows(float* dst, int64_t dst_stride, const S* src, int64_t src_stride, int64_t t, int64_t c) {
  for (int64_t r = 0; r < t; ++r) {
    float* d = dst + r * dst_stride;
    const S* x = src + r * src_stride;
    for (int64_t i = 0; i < c; ++i) d[i] = static_cast<float>(x[i]);
  }
}

// dst = float(a) + float(b), row by row: the stream leaving a vLLM decoder layer (hidden + residual)
template <typename S>
void add_rows(float* dst, int64_t dst_stride, const S* a, int64_t a_stride, const S* b, int64_t b_stride, int64_t t,
              int64_t c) {
  for (int64_t r = 0; r < t; ++r) {
    float* d = dst + r * dst_stride;
    const S* x = a + r * a_stride;
    const S* y = b + r * b_stride;
    for (int64_t i = 0; i < c; ++i) d[i] = static_cast<float>(x[i]) + static_cast<float>(y[i]);
  }
}

// A source the raw loops take: a CPU (T, C) matrix, rows contiguous, of a float type they know
bool raw_source(const at::Tensor& x, int64_t t) {
  return x.device().is_cpu() && x.dim() == 2 && x.size(0) == t && (x.stride(1) == 1 || x.size(1) == 1) &&
         (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf);
}

// Call f with x's data as a typed pointer (x passed raw_source)
template <typename F>
void with_data(const at::Tensor& x, F f) {
  switch (x.scalar_type()) {
    case at::kFloat: f(x.data_ptr<float>()); break;
    case at::kBFloat16: f(x.data_ptr<at::BFloat16>()); break;
    default: f(x.data_ptr<at::Half>()); break;
  }
}

// A place in a float32 step buffer: T rows `stride` floats apart, C contiguous each. Pointer
// arithmetic, not ATen views: a narrow or select is a dispatcher call and a new TensorImpl, ~1 us
// each, and a layer would make six.
struct Rows {
  float* data;
  int64_t stride;
  int64_t width;
};

// Copy src (T, C) into dst, C = dst.width; `view` makes the same place as an ATen view, for the
// sources the raw loops do not take (a GPU's, another shape or type)
template <typename View>
void copy_into(const Rows& dst, const at::Tensor& src, int64_t t, bool cpu, View view) {
  if (cpu && raw_source(src, t)) {
    TORCH_CHECK(src.size(1) == dst.width, "actprune: a tap of ", src.size(1), " columns for ", dst.width);
    with_data(src, [&](auto* x) { copy_rows(dst.data, dst.stride, x, src.stride(0), t, dst.width); });
  } else {
    view().copy_(src.reshape({t, dst.width}));
  }
}

void stash_layer(at::TensorList taps, const std::optional<at::Tensor>& router, const at::Tensor& hidden,
                 const std::optional<at::Tensor>& residual, const at::Tensor& phase, at::IntArrayRef offsets,
                 at::IntArrayRef groups, int64_t slot, int64_t router_slot, int64_t top_k, bool renormalize) {
  // taps: (T, C_k) each (or (..., C_k)), their columns at offsets[k] of chan; router: (T, E) or
  // None; hidden, residual: (T, H), the stream leaving the layer is hidden + residual
  Buffers b;
  const int64_t t = hidden.size(0);
  if (find_buffers(phase, b)) {
    const int64_t row = b.cursor.defined() ? b.cursor.data_ptr<int64_t>()[0] : 0;
    if (row + t <= b.chan.size(0)) {  // kept for end_step
      TORCH_CHECK(taps.size() == offsets.size(), "actprune: one offset a tap");
      const bool cpu = b.chan.device().is_cpu();
      float* chan = b.chan.data_ptr<float>() + row * b.chan.stride(0);  // (T, sum C)
      for (size_t k = 0; k < taps.size(); ++k) {
        const int64_t c = taps[k].size(-1);
        TORCH_CHECK(offsets[k] + c <= b.chan.size(1), "actprune: a tap past the channel buffer");
        copy_into(Rows{chan + offsets[k], b.chan.stride(0), c}, taps[k], t, cpu,
                  [&] { return b.chan.narrow(0, row, t).narrow(1, offsets[k], c); });
      }
      if (router.has_value()) {  // the columns past this layer's E stay -inf
        const int64_t e = router->size(-1);
        float* dst = b.routers.data_ptr<float>() + row * b.routers.stride(0) + router_slot * b.routers.stride(1);
        copy_into(Rows{dst, b.routers.stride(0), e}, *router, t, cpu,
                  [&] { return b.routers.narrow(0, row, t).select(1, router_slot).narrow(1, 0, e); });
      }
      // the stream leaving the layer, (T, H), rows (L + 1) * H apart
      const int64_t hsize = b.stream.size(2);
      Rows dst{b.stream.data_ptr<float>() + row * b.stream.stride(0) + slot * b.stream.stride(1), b.stream.stride(0),
               hsize};
      auto view = [&] { return b.stream.narrow(0, row, t).select(1, slot); };
      if (!residual.has_value()) {
        copy_into(dst, hidden, t, cpu, view);
      } else if (cpu && raw_source(hidden, t) && raw_source(*residual, t) &&
                 hidden.scalar_type() == residual->scalar_type() && hidden.size(1) == hsize &&
                 residual->size(1) == hsize) {
        const at::Tensor& r = *residual;
        with_data(hidden, [&](auto* h) {
          using S = std::remove_const_t<std::remove_pointer_t<decltype(h)>>;
          add_rows(dst.data, dst.stride, h, hidden.stride(0), r.data_ptr<S>(), r.stride(0), t, hsize);
        });
      } else {
        at::Tensor out = view();
        at::add_out(out, hidden.to(at::kFloat), residual->to(at::kFloat));
      }
      return;
    }
  }
  static auto slow = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("actprune::stash_layer_slow", "")
                         .typed<void(at::TensorList, const std::optional<at::Tensor>&, const at::Tensor&,
                                     const std::optional<at::Tensor>&, const at::Tensor&, at::IntArrayRef,
                                     at::IntArrayRef, int64_t, int64_t, int64_t, bool)>();
  slow.call(taps, router, hidden, residual, phase, offsets, groups, slot, router_slot, top_k, renormalize);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(actprune, m) {
  m.def("native_register(Tensor phase, Tensor chan, Tensor stream, Tensor routers, Tensor? cursor) -> ()",
        &register_buffers);
  m.def("native_forget(Tensor phase) -> ()", &forget_buffers);
}

TORCH_LIBRARY_IMPL(actprune, CompositeExplicitAutograd, m) { m.impl("stash_layer", &stash_layer); }
