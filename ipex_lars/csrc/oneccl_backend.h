// A torch.distributed (c10d) backend over oneCCL's host API for CPU tensors.
//
// Every collective is queued to one communication thread per backend, which
// launches the oneCCL operation, waits for its event and then completes the
// returned Work and its Future. The caller never blocks, so DDP overlaps the
// bucket allreduces with the rest of backward, and all ranks issue oneCCL
// operations in the order the program called them.
//
// A watchdog thread ends the process, with a message naming the collective,
// when one runs longer than the backend's timeout (a peer died or is stuck);
// a oneCCL error fails that Work and every later one instead of hanging.
#pragma once

#include <torch/extension.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include <oneapi/ccl.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace ipex_lars {

// The key-value store oneCCL uses to wire up a communicator. Rank 0 creates
// the main one and publishes its address; the other ranks connect to it.
class Kvs {
 public:
  static std::shared_ptr<Kvs> create_main();
  static std::shared_ptr<Kvs> connect(const std::string& address);
  std::string address() const;
  std::shared_ptr<ccl::kvs> handle() const { return kvs_; }

 private:
  explicit Kvs(std::shared_ptr<ccl::kvs> kvs) : kvs_(std::move(kvs)) {}
  std::shared_ptr<ccl::kvs> kvs_;
};

// The Work of one collective: completed by the communication thread.
class CclWork : public c10d::Work {
 public:
  CclWork(int rank, c10d::OpType type, std::vector<at::Tensor> outputs);
  c10::intrusive_ptr<c10::ivalue::Future> getFuture() override { return future_; }
  std::vector<at::Tensor> result() override { return outputs_; }
  // Marks the Work finished (or failed) and then completes its Future.
  void complete(std::exception_ptr error);

 private:
  std::vector<at::Tensor> outputs_;
  c10::intrusive_ptr<c10::ivalue::Future> future_;
};

class CclBackend : public c10d::Backend {
 public:
  CclBackend(const std::shared_ptr<Kvs>& kvs, int rank, int size, std::chrono::milliseconds timeout);
  ~CclBackend() override;

  const std::string getBackendName() const override { return "oneccl"; }

  c10::intrusive_ptr<c10d::Work> broadcast(std::vector<at::Tensor>& tensors,
                                           const c10d::BroadcastOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allreduce(std::vector<at::Tensor>& tensors,
                                           const c10d::AllreduceOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allgather(std::vector<std::vector<at::Tensor>>& outputs,
                                           std::vector<at::Tensor>& inputs,
                                           const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> _allgather_base(at::Tensor& output, at::Tensor& input,
                                                 const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> reduce_scatter(std::vector<at::Tensor>& outputs,
                                                std::vector<std::vector<at::Tensor>>& inputs,
                                                const c10d::ReduceScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> _reduce_scatter_base(at::Tensor& output, at::Tensor& input,
                                                      const c10d::ReduceScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> barrier(const c10d::BarrierOptions& opts) override;

 private:
  struct Op {
    const char* name;
    std::function<void()> run;  // launches the oneCCL operation, waits, copies results back
    c10::intrusive_ptr<CclWork> work;
  };

  c10::intrusive_ptr<c10d::Work> enqueue(const char* name, c10d::OpType type,
                                         std::vector<at::Tensor> outputs, std::function<void()> run);
  void communicate();  // body of the communication thread
  void watch();        // body of the watchdog thread
  [[noreturn]] void abort_job(const std::string& what, double seconds) const;

  std::chrono::milliseconds timeout_;
  std::unique_ptr<ccl::communicator> comm_;

  std::mutex mutex_;
  std::condition_variable queue_cv_;
  std::deque<Op> queue_;
  bool stopping_ = false;
  std::exception_ptr broken_;  // first oneCCL failure; later Works fail with it

  // What the communication thread runs now, for the watchdog.
  std::atomic<const char*> running_name_{nullptr};
  std::atomic<int64_t> running_since_ns_{0};
  std::atomic<uint64_t> running_seq_{0};
  std::condition_variable watch_cv_;

  std::thread comm_thread_;
  std::thread watch_thread_;
};

}  // namespace ipex_lars
