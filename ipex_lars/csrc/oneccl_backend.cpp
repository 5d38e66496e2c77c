// See oneccl_backend.h for the design.
#include "oneccl_backend.h"

#include <cstdio>
#include <cstdlib>
#include <optional>

namespace ipex_lars {
namespace {

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

ccl::datatype ccl_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return ccl::datatype::float32;
    case at::kDouble: return ccl::datatype::float64;
    case at::kBFloat16: return ccl::datatype::bfloat16;
    case at::kHalf: return ccl::datatype::float16;
    case at::kInt: return ccl::datatype::int32;
    case at::kLong: return ccl::datatype::int64;
    case at::kShort: return ccl::datatype::int16;
    case at::kChar: return ccl::datatype::int8;
    case at::kByte: return ccl::datatype::uint8;
    case at::kBool: return ccl::datatype::uint8;
    default:
      TORCH_CHECK(false, "oneccl backend: dtype ", t.scalar_type(),
                  " is not supported; use float32, float64, bfloat16, float16, int8/16/32/64 or uint8");
  }
}

// oneCCL's reduction for a c10d one. AVG is done as a sum followed by a division
// on the result, which oneCCL's CPU path needs and which works for every float type.
ccl::reduction ccl_reduction(const c10d::ReduceOp& op, const at::Tensor& t) {
  switch (op.op_) {
    case c10d::ReduceOp::SUM: return ccl::reduction::sum;
    case c10d::ReduceOp::PRODUCT: return ccl::reduction::prod;
    case c10d::ReduceOp::MIN: return ccl::reduction::min;
    case c10d::ReduceOp::MAX: return ccl::reduction::max;
    case c10d::ReduceOp::AVG:
      TORCH_CHECK(at::isFloatingType(t.scalar_type()),
                  "oneccl backend: ReduceOp.AVG needs a floating-point tensor, got ", t.scalar_type(),
                  "; use SUM and divide, or convert the tensor to float");
      return ccl::reduction::sum;
    default:
      TORCH_CHECK(false, "oneccl backend: this ReduceOp is not supported; use SUM, AVG, PRODUCT, MIN or MAX");
  }
}

void check_reducible(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() != at::kBool,
              "oneccl backend: cannot reduce bool tensors; convert to uint8 first");
}

at::Tensor& single(std::vector<at::Tensor>& tensors, const char* op) {
  TORCH_CHECK(tensors.size() == 1, "oneccl backend: ", op, " takes exactly one tensor per rank, got ",
              tensors.size());
  const at::Tensor& t = tensors[0];
  TORCH_CHECK(t.device().is_cpu(), "oneccl backend: ", op, " needs a CPU tensor, got one on ", t.device(),
              "; move it with .cpu() or use a backend for that device");
  TORCH_CHECK(!t.is_sparse(), "oneccl backend: ", op, " does not support sparse tensors");
  return tensors[0];
}

void check_cpu(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.device().is_cpu() && !t.is_sparse(), "oneccl backend: ", op,
              " needs dense CPU tensors, got ", t.device());
}

// A contiguous view of `t` for oneCCL to read or write: `t` itself when it is
// contiguous, otherwise a copy that `writeback` returns to `t` afterwards.
struct Staged {
  at::Tensor user;
  at::Tensor buffer;
  explicit Staged(const at::Tensor& t) : user(t), buffer(t.contiguous()) {}
  void writeback() {
    if (!buffer.is_same(user)) user.copy_(buffer);
  }
};

// Drives a oneCCL operation to completion. With CCL_WORKER_OFFLOAD=0 the caller's test()
// calls make the progress; yielding between them leaves the core to this rank's compute
// thread (DDP's backward) instead of spinning against it.
void finish(ccl::event&& event) {
  while (!event.test()) std::this_thread::yield();
}

}  // namespace

// ---------------------------------------------------------------- Kvs

std::shared_ptr<Kvs> Kvs::create_main() {
  ccl::init();
  return std::shared_ptr<Kvs>(new Kvs(ccl::create_main_kvs()));
}

std::shared_ptr<Kvs> Kvs::connect(const std::string& address) {
  ccl::init();
  ccl::kvs::address_type addr{};
  TORCH_CHECK(address.size() == addr.size(), "oneccl backend: kvs address has ", address.size(),
              " bytes, expected ", addr.size(), "; all ranks must use the same oneCCL version");
  std::copy(address.begin(), address.end(), addr.begin());
  return std::shared_ptr<Kvs>(new Kvs(ccl::create_kvs(addr)));
}

std::string Kvs::address() const {
  auto addr = kvs_->get_address();
  return std::string(addr.begin(), addr.end());
}

// ---------------------------------------------------------------- CclWork

CclWork::CclWork(int rank, c10d::OpType type, std::vector<at::Tensor> outputs)
    : c10d::Work(rank, type),
      outputs_(std::move(outputs)),
      future_(c10::make_intrusive<c10::ivalue::Future>(c10::ListType::create(c10::TensorType::get()))) {}

void CclWork::complete(std::exception_ptr error) {
  finish(error);
  if (error) {
    future_->setError(error);
  } else {
    future_->markCompleted(c10::IValue(outputs_));
  }
}

// ---------------------------------------------------------------- CclBackend

CclBackend::CclBackend(const std::shared_ptr<Kvs>& kvs, int rank, int size, std::chrono::milliseconds timeout)
    : c10d::Backend(rank, size), timeout_(timeout) {
  // Creating the communicator waits for every rank; the watchdog bounds that wait too.
  running_name_ = "creating the communicator";
  running_since_ns_ = now_ns();
  watch_thread_ = std::thread([this] { watch(); });
  try {
    comm_ = std::make_unique<ccl::communicator>(ccl::create_communicator(size, rank, kvs->handle()));
  } catch (...) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    watch_cv_.notify_all();
    watch_thread_.join();
    throw;
  }
  running_name_ = nullptr;
  comm_thread_ = std::thread([this] { communicate(); });
}

CclBackend::~CclBackend() {
  // The last queued ops may drop tensors owned by Python, which takes the GIL on
  // the communication thread; holding it here while joining would deadlock.
  std::optional<py::gil_scoped_release> no_gil;
  if (Py_IsInitialized() && PyGILState_Check()) no_gil.emplace();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  queue_cv_.notify_all();
  watch_cv_.notify_all();
  if (comm_thread_.joinable()) comm_thread_.join();  // finishes the queued collectives first
  if (watch_thread_.joinable()) watch_thread_.join();
}

c10::intrusive_ptr<c10d::Work> CclBackend::enqueue(const char* name, c10d::OpType type,
                                                   std::vector<at::Tensor> outputs, std::function<void()> run) {
  auto work = c10::make_intrusive<CclWork>(getRank(), type, std::move(outputs));
  {
    std::lock_guard<std::mutex> lock(mutex_);
    TORCH_CHECK(!stopping_, "oneccl backend: ", name, " called on a backend that is shutting down");
    queue_.push_back(Op{name, std::move(run), work});
  }
  queue_cv_.notify_one();
  return work;
}

void CclBackend::communicate() {
  uint64_t seq = 0;
  for (;;) {
    Op op;
    std::exception_ptr broken;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      queue_cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping, and nothing left to run
      op = std::move(queue_.front());
      queue_.pop_front();
      broken = broken_;
    }
    if (broken) {
      op.work->complete(broken);
      continue;
    }
    running_seq_ = ++seq;
    running_since_ns_ = now_ns();
    running_name_ = op.name;
    std::exception_ptr error;
    try {
      op.run();
    } catch (const std::exception& e) {
      error = std::make_exception_ptr(std::runtime_error(c10::str(
          "oneccl backend: ", op.name, " (collective #", seq, ") failed on rank ", getRank(), ": ", e.what(),
          ". A peer rank probably exited; every later collective on this process group fails too.")));
    }
    running_name_ = nullptr;
    if (error) {
      std::lock_guard<std::mutex> lock(mutex_);
      broken_ = error;
    }
    op.work->complete(error);
  }
}

void CclBackend::watch() {
  const auto tick = std::min<std::chrono::milliseconds>(std::chrono::milliseconds(100), timeout_ / 4 + std::chrono::milliseconds(1));
  std::unique_lock<std::mutex> lock(mutex_);
  while (!stopping_) {
    watch_cv_.wait_for(lock, tick);
    const char* name = running_name_.load();
    if (name == nullptr) continue;
    const double seconds = (now_ns() - running_since_ns_.load()) * 1e-9;
    if (seconds * 1000.0 > static_cast<double>(timeout_.count()) && running_name_.load() == name) {
      abort_job(name, seconds);
    }
  }
}

void CclBackend::abort_job(const std::string& what, double seconds) const {
  std::fprintf(stderr,
               "[ipex-lars oneccl] rank %d: %s (collective #%llu) has not completed after %.1f s, more than the "
               "process group timeout of %.1f s. A peer rank died or is stuck. Ending this process (exit code 1) "
               "so the job does not hang. If the peers are only slow, raise the timeout: IPEX_LARS_DIST_TIMEOUT="
               "<seconds> (or ipex_lars.distributed.init(timeout=...), init_process_group(timeout=...)).\n",
               getRank(), what.c_str(), static_cast<unsigned long long>(running_seq_.load()), seconds,
               timeout_.count() / 1000.0);
  std::fflush(stderr);
  std::_Exit(1);
}

// ---------------------------------------------------------------- collectives

c10::intrusive_ptr<c10d::Work> CclBackend::broadcast(std::vector<at::Tensor>& tensors,
                                                     const c10d::BroadcastOptions& opts) {
  at::Tensor& t = single(tensors, "broadcast");
  const int root = static_cast<int>(opts.rootRank + opts.rootTensor);
  TORCH_CHECK(root >= 0 && root < getSize(), "oneccl backend: broadcast root ", root, " is not a rank of ",
              getSize());
  const auto dtype = ccl_type(t);
  return enqueue("broadcast", c10d::OpType::BROADCAST, {t}, [this, t, dtype, root] {
    Staged s(t);
    finish(ccl::broadcast(s.buffer.data_ptr(), s.buffer.numel(), dtype, root, *comm_));
    s.writeback();
  });
}

c10::intrusive_ptr<c10d::Work> CclBackend::allreduce(std::vector<at::Tensor>& tensors,
                                                     const c10d::AllreduceOptions& opts) {
  at::Tensor& t = single(tensors, "allreduce");
  check_reducible(t);
  const auto dtype = ccl_type(t);
  const auto red = ccl_reduction(opts.reduceOp, t);
  const bool average = opts.reduceOp.op_ == c10d::ReduceOp::AVG;
  const int size = getSize();
  return enqueue("allreduce", c10d::OpType::ALLREDUCE, {t}, [this, t, dtype, red, average, size] {
    Staged s(t);
    void* buf = s.buffer.data_ptr();
    finish(ccl::allreduce(buf, buf, s.buffer.numel(), dtype, red, *comm_));
    if (average) s.buffer.div_(size);
    s.writeback();
  });
}

c10::intrusive_ptr<c10d::Work> CclBackend::allgather(std::vector<std::vector<at::Tensor>>& outputs,
                                                     std::vector<at::Tensor>& inputs,
                                                     const c10d::AllgatherOptions&) {
  at::Tensor& in = single(inputs, "allgather");
  TORCH_CHECK(outputs.size() == 1 && static_cast<int>(outputs[0].size()) == getSize(),
              "oneccl backend: allgather needs one output list with world_size (", getSize(), ") tensors");
  for (const auto& o : outputs[0]) {
    check_cpu(o, "allgather");
    TORCH_CHECK(o.numel() == in.numel() && o.scalar_type() == in.scalar_type(),
                "oneccl backend: allgather outputs must match the input's numel (", in.numel(), ") and dtype (",
                in.scalar_type(), ")");
  }
  const auto dtype = ccl_type(in);
  std::vector<at::Tensor> outs = outputs[0];
  return enqueue("allgather", c10d::OpType::ALLGATHER, outs, [this, in, outs, dtype] {
    at::Tensor src = in.contiguous();
    std::vector<Staged> staged;
    std::vector<void*> bufs;
    staged.reserve(outs.size());
    for (const auto& o : outs) {
      staged.emplace_back(o);
      bufs.push_back(staged.back().buffer.data_ptr());
    }
    std::vector<size_t> counts(outs.size(), static_cast<size_t>(src.numel()));
    finish(ccl::allgatherv(src.data_ptr(), src.numel(), bufs, counts, dtype, *comm_));
    for (auto& s : staged) s.writeback();
  });
}

c10::intrusive_ptr<c10d::Work> CclBackend::_allgather_base(at::Tensor& output, at::Tensor& input,
                                                           const c10d::AllgatherOptions&) {
  check_cpu(input, "all_gather_into_tensor");
  check_cpu(output, "all_gather_into_tensor");
  TORCH_CHECK(output.numel() == input.numel() * getSize() && output.scalar_type() == input.scalar_type(),
              "oneccl backend: all_gather_into_tensor needs an output of world_size x input numel (",
              input.numel() * getSize(), ") with the input's dtype; got ", output.numel(), " ",
              output.scalar_type());
  const auto dtype = ccl_type(input);
  const int size = getSize();
  return enqueue("all_gather_into_tensor", c10d::OpType::_ALLGATHER_BASE, {output},
                 [this, input, output, dtype, size] {
                   at::Tensor src = input.contiguous();
                   Staged dst(output);
                   std::vector<size_t> counts(size, static_cast<size_t>(src.numel()));
                   finish(ccl::allgatherv(src.data_ptr(), src.numel(), dst.buffer.data_ptr(), counts, dtype, *comm_));
                   dst.writeback();
                 });
}

c10::intrusive_ptr<c10d::Work> CclBackend::_reduce_scatter_base(at::Tensor& output, at::Tensor& input,
                                                                const c10d::ReduceScatterOptions& opts) {
  check_cpu(input, "reduce_scatter_tensor");
  check_cpu(output, "reduce_scatter_tensor");
  check_reducible(input);
  TORCH_CHECK(input.numel() == output.numel() * getSize() && output.scalar_type() == input.scalar_type(),
              "oneccl backend: reduce_scatter_tensor needs an input of world_size x output numel (",
              output.numel() * getSize(), ") with the output's dtype; got ", input.numel(), " ",
              input.scalar_type());
  const auto dtype = ccl_type(input);
  const auto red = ccl_reduction(opts.reduceOp, input);
  const bool average = opts.reduceOp.op_ == c10d::ReduceOp::AVG;
  const int size = getSize();
  return enqueue("reduce_scatter_tensor", c10d::OpType::_REDUCE_SCATTER_BASE, {output},
                 [this, input, output, dtype, red, average, size] {
                   at::Tensor src = input.contiguous();
                   Staged dst(output);
                   finish(ccl::reduce_scatter(src.data_ptr(), dst.buffer.data_ptr(), dst.buffer.numel(), dtype, red,
                                       *comm_));
                   if (average) dst.buffer.div_(size);
                   dst.writeback();
                 });
}

c10::intrusive_ptr<c10d::Work> CclBackend::reduce_scatter(std::vector<at::Tensor>& outputs,
                                                          std::vector<std::vector<at::Tensor>>& inputs,
                                                          const c10d::ReduceScatterOptions& opts) {
  at::Tensor& out = single(outputs, "reduce_scatter");
  TORCH_CHECK(inputs.size() == 1 && static_cast<int>(inputs[0].size()) == getSize(),
              "oneccl backend: reduce_scatter needs one input list with world_size (", getSize(), ") tensors");
  std::vector<at::Tensor> flat;
  for (const auto& i : inputs[0]) {
    check_cpu(i, "reduce_scatter");
    TORCH_CHECK(i.numel() == out.numel() && i.scalar_type() == out.scalar_type(),
                "oneccl backend: reduce_scatter inputs must match the output's numel and dtype");
    flat.push_back(i.reshape({-1}));
  }
  at::Tensor input = at::cat(flat);  // one send buffer, rank-major, as oneCCL expects
  return _reduce_scatter_base(out, input, opts);
}

c10::intrusive_ptr<c10d::Work> CclBackend::barrier(const c10d::BarrierOptions&) {
  return enqueue("barrier", c10d::OpType::BARRIER, {}, [this] { finish(ccl::barrier(*comm_)); });
}

}  // namespace ipex_lars

// ---------------------------------------------------------------- Python module

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "oneCCL c10d backend for ipex_lars.distributed (load it through ipex_lars.ext)";
  py::class_<ipex_lars::Kvs, std::shared_ptr<ipex_lars::Kvs>>(m, "Kvs")
      .def_static("create_main", &ipex_lars::Kvs::create_main, py::call_guard<py::gil_scoped_release>(),
                  "Create the main key-value store (rank 0).")
      .def_static(
          "connect",
          [](const py::bytes& address) {
            std::string addr = address;
            py::gil_scoped_release release;
            return ipex_lars::Kvs::connect(addr);
          },
          "Connect to rank 0's key-value store by its address.")
      .def("address", [](const ipex_lars::Kvs& kvs) { return py::bytes(kvs.address()); });
  py::class_<ipex_lars::CclBackend, c10d::Backend, c10::intrusive_ptr<ipex_lars::CclBackend>>(m, "Backend")
      .def(py::init([](const std::shared_ptr<ipex_lars::Kvs>& kvs, int rank, int size, int64_t timeout_ms) {
             return c10::make_intrusive<ipex_lars::CclBackend>(kvs, rank, size,
                                                               std::chrono::milliseconds(timeout_ms));
           }),
           py::arg("kvs"), py::arg("rank"), py::arg("size"), py::arg("timeout_ms"),
           py::call_guard<py::gil_scoped_release>(),
           "Create the communicator (blocks until every rank does; ends the process after timeout_ms).");
}
