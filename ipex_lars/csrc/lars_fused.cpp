// Fused multi-tensor LARS step (You, Gitman, Ginsburg, arXiv 1708.03888;
// You, Zhang, Hsieh, Demmel, Keutzer, "ImageNet Training in Minutes").
//
// One call updates every tensor of a param group, on ATen's thread pool,
// vectorised with at::vec. A tensor that fits in one block is one work item:
// norms, trust ratio and update while it sits in L1. Larger tensors are cut
// into fixed-size blocks and processed in batches of consecutive tensors that
// fit in the last-level cache: a norm pass, then an update pass that re-reads
// w and g from cache rather than DRAM. Norm partials are summed per block in a
// fixed order, so results do not depend on the thread count. The trust ratio
// never leaves the kernel: no host sync per tensor. Every input is checked
// before anything is written, so a bad one raises and leaves all tensors as
// they were. Weights that are not dense (a transposed or sliced view) are
// stepped through a dense copy, and only those. The kernel keeps nothing
// between calls: it sees exactly the tensors it is given. It reads them from
// the Python lists without reference counting, holding the GIL and keeping
// Python dispatch modes out of its own ATen calls, so that no Python code can
// replace one meanwhile; it lets the GIL go only for the large tensors, after
// taking references that keep those tensors alive.
//
// The update, with d = g + wd*w and rate = lr*tau (or min(tau, lr) with clip):
//   paper style: v = m*v + rate*d;  w -= nesterov ? m*v + rate*d : v
//   sgd style:   v = m*v + d;       w -= rate * (nesterov ? m*v + d : v)
// Both are v = m*v + a*d; w -= s*(nesterov ? m*v + a*d : v) with
// (a, s) = (rate, 1) for the paper and (1, rate) for sgd.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

using Vec = at::vec::Vectorized<float>;
using BVec = at::vec::Vectorized<at::BFloat16>;

constexpr int64_t kBlock = 16384;          // elements per parallel work item
constexpr int64_t kBatchElems = 1 << 19;   // elements per cache-sized batch of tensors

struct Slot {
  float* w;                   // fp32 weights: the parameter or its fp32 master copy
  const void* g;              // gradient, fp32 or bf16
  bool g_bf16;
  float* v;                   // fp32 momentum buffer
  at::BFloat16* low;          // bf16 parameter refreshed from the master, or nullptr
  int64_t n;
  float a = 0.f, s = 0.f;     // update coefficients, set per step
};

struct Hyper {
  double lr, momentum, wd, eta, eps;
  bool nesterov, paper_style, clip, adapt;
};

struct Block {
  int32_t slot;
  int64_t begin, end;
};

// Loads 2*Vec::size() gradient values starting at i as two float vectors.
inline void load_grad(const Slot& t, int64_t i, Vec& g0, Vec& g1) {
  if (t.g_bf16) {
    auto b = BVec::loadu(static_cast<const at::BFloat16*>(t.g) + i);
    std::tie(g0, g1) = at::vec::convert_to_float<at::BFloat16>(b);
  } else {
    const float* g = static_cast<const float*>(t.g) + i;
    g0 = Vec::loadu(g);
    g1 = Vec::loadu(g + Vec::size());
  }
}

inline float grad_at(const Slot& t, int64_t i) {
  return t.g_bf16 ? static_cast<float>(static_cast<const at::BFloat16*>(t.g)[i])
                  : static_cast<const float*>(t.g)[i];
}

// Sums of squares of w and g over [begin, end) of one tensor.
void sumsq(const Slot& t, int64_t begin, int64_t end, double& sw, double& sg) {
  constexpr int64_t kStep = 2 * Vec::size();
  Vec aw0(0.f), aw1(0.f), ag0(0.f), ag1(0.f);
  int64_t i = begin;
  for (; i + kStep <= end; i += kStep) {
    Vec w0 = Vec::loadu(t.w + i), w1 = Vec::loadu(t.w + i + Vec::size());
    Vec g0, g1;
    load_grad(t, i, g0, g1);
    aw0 = at::vec::fmadd(w0, w0, aw0);
    aw1 = at::vec::fmadd(w1, w1, aw1);
    ag0 = at::vec::fmadd(g0, g0, ag0);
    ag1 = at::vec::fmadd(g1, g1, ag1);
  }
  float lw[Vec::size()], lg[Vec::size()];
  (aw0 + aw1).store(lw);
  (ag0 + ag1).store(lg);
  double w = 0.0, g = 0.0;
  for (int64_t k = 0; k < Vec::size(); ++k) {
    w += lw[k];
    g += lg[k];
  }
  for (; i < end; ++i) {
    float gi = grad_at(t, i);
    w += static_cast<double>(t.w[i]) * t.w[i];
    g += static_cast<double>(gi) * gi;
  }
  sw = w;
  sg = g;
}

void update(const Slot& t, int64_t begin, int64_t end, float m, float wd, bool nesterov) {
  constexpr int64_t kStep = 2 * Vec::size();
  const Vec vm(m), vwd(wd), va(t.a), vs(t.s);
  auto one = [&](Vec w, Vec g, Vec v, Vec& w_out, Vec& v_out) {
    Vec d = at::vec::fmadd(vwd, w, g);
    Vec u = va * d;
    v_out = at::vec::fmadd(vm, v, u);
    Vec step = nesterov ? at::vec::fmadd(vm, v_out, u) : v_out;
    w_out = w - vs * step;
  };
  int64_t i = begin;
  for (; i + kStep <= end; i += kStep) {
    Vec g0, g1;
    load_grad(t, i, g0, g1);
    Vec w0 = Vec::loadu(t.w + i), w1 = Vec::loadu(t.w + i + Vec::size());
    Vec v0 = Vec::loadu(t.v + i), v1 = Vec::loadu(t.v + i + Vec::size());
    one(w0, g0, v0, w0, v0);
    one(w1, g1, v1, w1, v1);
    w0.store(t.w + i);
    w1.store(t.w + i + Vec::size());
    v0.store(t.v + i);
    v1.store(t.v + i + Vec::size());
    if (t.low) {
      auto b = at::vec::convert_from_float<at::BFloat16>(w0, w1);
      b.store(t.low + i);
    }
  }
  for (; i < end; ++i) {
    float w = t.w[i], g = grad_at(t, i), v = t.v[i];
    float d = wd * w + g;
    float u = t.a * d;
    v = m * v + u;
    float step = nesterov ? m * v + u : v;
    w = w - t.s * step;
    t.w[i] = w;
    t.v[i] = v;
    if (t.low) t.low[i] = static_cast<at::BFloat16>(w);
  }
}

bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes() == b.sizes() && a.strides() == b.strides();
}

// Sets the update coefficients of one tensor from its sums of squares.
void set_rate(Slot& t, double sw, double sg, const Hyper& h) {
  double rate = h.lr;
  if (h.adapt) {
    const double wn = std::sqrt(sw), gn = std::sqrt(sg);
    const double tau = (wn > 0.0 && gn > 0.0) ? h.eta * wn / (gn + h.wd * wn + h.eps) : 1.0;
    rate = h.clip ? std::min(tau, h.lr) : h.lr * tau;
  }
  t.a = h.paper_style ? static_cast<float>(rate) : 1.f;
  t.s = h.paper_style ? 1.f : static_cast<float>(rate);
}

// A tensor of one block: norms, rate and update while it sits in L1.
void step_small(Slot& t, const Hyper& h) {
  double sw = 0.0, sg = 0.0;
  if (h.adapt) sumsq(t, 0, t.n, sw, sg);
  set_rate(t, sw, sg, h);
  update(t, 0, t.n, static_cast<float>(h.momentum), static_cast<float>(h.wd), h.nesterov);
}

void step_large(std::vector<Slot>& slots, const std::vector<int32_t>& large, const Hyper& h) {
  const float m = static_cast<float>(h.momentum), wd = static_cast<float>(h.wd);
  // Larger tensors: a norm pass then an update pass over fixed-size blocks, in batches of
  // consecutive tensors small enough that the update re-reads them from cache.
  std::vector<Block> blocks;
  std::vector<double> partial;  // 2 per block: sum w^2, sum g^2
  size_t first = 0;
  while (first < large.size()) {
    size_t last = first;
    int64_t elems = 0;
    blocks.clear();
    while (last < large.size() && (last == first || elems + slots[large[last]].n <= kBatchElems)) {
      const int64_t n = slots[large[last]].n;
      for (int64_t b = 0; b < n; b += kBlock) blocks.push_back({large[last], b, std::min(b + kBlock, n)});
      elems += n;
      ++last;
    }
    const int64_t nb = static_cast<int64_t>(blocks.size());
    partial.assign(2 * nb, 0.0);
    if (h.adapt) {
      at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b)
          sumsq(slots[blocks[b].slot], blocks[b].begin, blocks[b].end, partial[2 * b], partial[2 * b + 1]);
      });
    }
    // Per tensor: sum its block partials in block order, so the result is independent of threads.
    for (int64_t b = 0; b < nb;) {
      const int32_t slot = blocks[b].slot;
      double sw = 0.0, sg = 0.0;
      for (; b < nb && blocks[b].slot == slot; ++b) {
        sw += partial[2 * b];
        sg += partial[2 * b + 1];
      }
      set_rate(slots[slot], sw, sg, h);
    }
    at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t k = b0; k < b1; ++k)
        update(slots[blocks[k].slot], blocks[k].begin, blocks[k].end, m, wd, h.nesterov);
    });
    first = last;
  }
}

std::string shape_of(const at::Tensor& t) {
  std::ostringstream out;
  out << t.sizes();
  return out.str();
}

// One tensor's inputs, borrowed from the Python objects that hold them.
struct Item {
  const at::Tensor* w = nullptr;    // fp32 weights: the parameter, or its fp32 master
  const at::Tensor* g = nullptr;    // gradient; undefined: the tensor is skipped
  const at::Tensor* v = nullptr;    // fp32 momentum
  const at::Tensor* low = nullptr;  // the bf16 parameter of a master, or nullptr
};

const at::Tensor& unpack(PyObject* obj, const char* what, size_t i) {
  TORCH_CHECK_TYPE(THPVariable_Check(obj), "LARS fused: ", what, "[", i, "] is not a tensor");
  return THPVariable_Unpack(obj);
}

const at::Tensor kUndefined;

// Borrows every tensor (no reference counting: on thousands of small tensors the atomic counts
// cost more than the step). Safe because this runs with the GIL held, so no Python code can
// replace a tensor meanwhile. grads None: each parameter's own .grad. A missing gradient: skipped.
std::vector<Item> borrow(const py::list& params, const py::object& grads, const py::list& bufs,
                         const py::object& masters) {
  const size_t n = params.size();
  const bool own_grads = grads.is_none(), any_master = !masters.is_none();
  TORCH_CHECK_VALUE(bufs.size() == n && (own_grads || py::len(grads) == n) && (!any_master || py::len(masters) == n),
                    "LARS: params, grads, momentum_buffers and master_params must have the same length");
  TORCH_CHECK_TYPE((own_grads || PyList_Check(grads.ptr())) && (!any_master || PyList_Check(masters.ptr())),
                   "LARS fused: grads and master_params must be lists");
  std::vector<Item> items(n);
  for (size_t i = 0; i < n; ++i) {
    Item& it = items[i];
    const at::Tensor& p = unpack(PyList_GET_ITEM(params.ptr(), i), "params", i);
    PyObject* master = any_master ? PyList_GET_ITEM(masters.ptr(), i) : Py_None;
    if (master == Py_None) {
      it.w = &p;
    } else {
      it.w = &unpack(master, "master_params", i);
      it.low = &p;
    }
    PyObject* grad = own_grads ? nullptr : PyList_GET_ITEM(grads.ptr(), i);
    it.g = own_grads ? &p.unsafeGetTensorImpl()->grad() : grad == Py_None ? &kUndefined : &unpack(grad, "grads", i);
    it.v = &unpack(PyList_GET_ITEM(bufs.ptr(), i), "momentum_buffers", i);
  }
  return items;
}

// A tensor whose operations run in C++: a tensor subclass that dispatches to Python would need
// the GIL, which this kernel holds while its threads run.
bool plain(const at::Tensor& t) {
  return !t.unsafeGetTensorImpl()->is_python_dispatch() && t.has_storage();
}

// Checks every input before anything is written: an invalid one raises and leaves all untouched.
void validate(const std::vector<Item>& items) {
  for (size_t i = 0; i < items.size(); ++i) {
    const Item& it = items[i];
    const at::Tensor &w = *it.w, &g = *it.g, &v = *it.v;
    if (!g.defined()) continue;  // no gradient: skipped
    TORCH_CHECK_VALUE(w.defined() && v.defined(), "LARS fused: tensor ", i, " is undefined");
    TORCH_CHECK(!w.is_sparse() && !g.is_sparse() && !v.is_sparse(), "LARS does not support sparse gradients");
    for (const at::Tensor* t : {&w, &g, &v, it.low})
      TORCH_CHECK_VALUE(!t || t->layout() == at::kStrided, "LARS takes dense (strided) tensors, got layout ",
                        t->layout(), " for tensor ", i);
    TORCH_CHECK_TYPE(plain(w) && plain(g) && plain(v) && (!it.low || plain(*it.low)),
                     "LARS fused takes plain tensors with storage, not tensor subclasses (tensor ", i,
                     "); use impl='foreach' for those");
    TORCH_CHECK_VALUE(w.device().is_cpu() && g.device().is_cpu() && v.device().is_cpu(),
                      "LARS fused runs on CPU tensors; use impl='foreach' for other devices");
    TORCH_CHECK_VALUE(w.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
                      "LARS: weights and momentum must be float32 (bf16 parameters keep an fp32 master), "
                      "got ", w.scalar_type(), " and ", v.scalar_type(), " for tensor ", i);
    TORCH_CHECK_VALUE(g.scalar_type() == at::kFloat || g.scalar_type() == at::kBFloat16,
                      "LARS fused: gradients must be float32 or bfloat16, got ", g.scalar_type(), " for tensor ", i);
    TORCH_CHECK_VALUE(g.sizes() == w.sizes(), "LARS: gradient of shape ", shape_of(g), " for a parameter of shape ",
                      shape_of(w));
    TORCH_CHECK_VALUE(v.sizes() == w.sizes(), "LARS state does not fit its parameter: momentum of shape ",
                      shape_of(v), " for a parameter of shape ", shape_of(w),
                      "; load the optimizer state saved with this model");
    if (it.low) {
      const at::Tensor& low = *it.low;
      TORCH_CHECK_VALUE(low.scalar_type() == at::kBFloat16 && low.device().is_cpu() && low.sizes() == w.sizes(),
                        "LARS: a parameter with an fp32 master copy must be a bfloat16 CPU tensor of its shape");
    }
  }
}

// Tensors made for a tensor whose weights are not dense, or whose gradient, momentum or bf16
// copy has another layout than its weights; w, v and low are copied back after the step.
struct Temps {
  explicit Temps(int64_t n) : w(n), g(n), v(n), low(n) {}
  std::vector<at::Tensor> w, g, v, low;
};

// Fills slot i, making dense temporaries where layouts differ. False: nothing to do.
bool prepare(int64_t i, const Item& it, Slot& s, Temps& temps) {
  const at::Tensor &w = *it.w, &g = *it.g, &v = *it.v;
  if (!g.defined() || w.numel() == 0) return false;
  const at::Tensor* base = &w;
  if (!w.is_non_overlapping_and_dense()) {  // e.g. a transposed or sliced view: step a dense copy
    temps.w[i] = w.contiguous();
    base = &temps.w[i];
  }
  const at::Tensor* gg = &g;
  if (!same_layout(g, *base)) {
    temps.g[i] = at::empty_like(*base, g.scalar_type());
    temps.g[i].copy_(g);
    gg = &temps.g[i];
  }
  const at::Tensor* vv = &v;
  if (!same_layout(v, *base)) {
    temps.v[i] = at::empty_like(*base);
    temps.v[i].copy_(v);
    vv = &temps.v[i];
  }
  s.low = nullptr;
  if (it.low) {
    if (same_layout(*it.low, *base)) {
      s.low = it.low->data_ptr<at::BFloat16>();
    } else {
      temps.low[i] = at::empty_like(*base, it.low->scalar_type());
      s.low = temps.low[i].data_ptr<at::BFloat16>();
    }
  }
  s.w = base->data_ptr<float>();
  s.g = gg->data_ptr();
  s.g_bf16 = gg->scalar_type() == at::kBFloat16;
  s.v = vv->data_ptr<float>();
  s.n = w.numel();
  return true;
}

// One LARS step over every tensor given, with one set of hyperparameters (one param group).
// params[i] is stepped in place, or, when master_params[i] is an fp32 master (master_params
// None: no tensor has one), the master is stepped and rounded into the bf16 params[i].
// grads None: each parameter's .grad, skipping parameters without one.
void lars_step(const py::list& params, const py::object& grads, const py::list& bufs, const py::object& masters,
               double lr, double momentum, double weight_decay, double trust_coefficient, double eps, bool nesterov,
               bool paper_style, bool clip, bool adapt) {
  // Python dispatch modes (a TorchDispatchMode on this thread) stay out of the ATen calls made
  // here: their Python code could let the GIL go, and another thread free a borrowed tensor.
  const c10::impl::ExcludeDispatchKeyGuard no_python(
      c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot}));
  const std::vector<Item> items = borrow(params, grads, bufs, masters);
  validate(items);
  const Hyper h{lr, momentum, weight_decay, trust_coefficient, eps, nesterov, paper_style, clip, adapt};
  const int64_t n = static_cast<int64_t>(items.size());
  std::vector<Slot> slots(n);
  std::vector<uint8_t> large_flag(n, 0);
  Temps temps(n);
  // One pass: each thread prepares its share of the tensors and updates the small ones at once,
  // so a tensor's metadata and data are touched by one core, close together in time.
  at::parallel_for(0, n, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      if (!prepare(i, items[i], slots[i], temps)) continue;
      if (slots[i].n <= kBlock) {
        step_small(slots[i], h);
      } else {
        large_flag[i] = 1;
      }
    }
  });
  // The large tensors run without the GIL, holding references that keep the tensors alive (as
  // torch's own ops do; a write through .data from another thread meanwhile is the caller's race).
  std::vector<int32_t> large;
  std::vector<at::Tensor> held;
  for (int64_t i = 0; i < n; ++i) {
    if (!large_flag[i]) continue;
    large.push_back(static_cast<int32_t>(i));
    for (const at::Tensor* t : {items[i].w, items[i].g, items[i].v, items[i].low})
      if (t) held.push_back(*t);
  }
  if (!large.empty()) {
    py::gil_scoped_release no_gil;
    step_large(slots, large, h);
  }
  for (int64_t i = 0; i < n; ++i) {
    if (temps.w[i].defined()) items[i].w->copy_(temps.w[i]);
    if (temps.v[i].defined()) items[i].v->copy_(temps.v[i]);
    if (temps.low[i].defined()) items[i].low->copy_(temps.low[i]);
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused multi-tensor LARS step for CPU tensors";
  m.attr("vector_width") = static_cast<int64_t>(Vec::size());
  m.def("lars_step", &lars_step, py::arg("params"), py::arg("grads"), py::arg("momentum_buffers"),
        py::arg("master_params"), py::arg("lr"), py::arg("momentum"), py::arg("weight_decay"),
        py::arg("trust_coefficient"), py::arg("eps"), py::arg("nesterov"), py::arg("paper_style"), py::arg("clip"),
        py::arg("adapt"));
}
