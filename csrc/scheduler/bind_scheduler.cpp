// Python bindings of the rollout scheduler (videocom_fast._C.Scheduler and its plain-data structs), with
// the same names and fields as the Python twin in videocom_fast/rollout/scheduler.py. Argument checks live
// in the core and throw std::invalid_argument, which pybind11 turns into ValueError; invariant failures are
// std::logic_error -> RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "scheduler/scheduler.h"

namespace py = pybind11;
using namespace vcf::sched;

namespace {

std::string repr_scheduled(const ScheduledSeq& c) {
  return "ScheduledSeq(seq_id=" + std::to_string(c.seq_id) + ", start=" + std::to_string(c.start) +
         ", num_tokens=" + std::to_string(c.num_tokens) + ", is_prefill=" + (c.is_prefill ? "True" : "False") +
         ", blocks=" + std::to_string(c.block_ids.size()) + ", samples=" + (c.samples ? "True" : "False") + ")";
}

}  // namespace

void register_scheduler(py::module_& m) {
  py::class_<SchedulerConfig>(m, "SchedulerConfig", "Budgets of the rollout scheduler (same fields as Python's).")
      .def(py::init([](int64_t max_num_batched_tokens, int64_t max_num_seqs, int64_t block_size,
                       int64_t num_blocks, int64_t max_prefill_chunk) {
             return SchedulerConfig{max_num_batched_tokens, max_num_seqs, block_size, num_blocks,
                                    max_prefill_chunk};
           }),
           py::arg("max_num_batched_tokens") = 2048, py::arg("max_num_seqs") = 256, py::arg("block_size") = 16,
           py::arg("num_blocks") = 4096, py::arg("max_prefill_chunk") = 512)
      .def_readwrite("max_num_batched_tokens", &SchedulerConfig::max_num_batched_tokens)
      .def_readwrite("max_num_seqs", &SchedulerConfig::max_num_seqs)
      .def_readwrite("block_size", &SchedulerConfig::block_size)
      .def_readwrite("num_blocks", &SchedulerConfig::num_blocks)
      .def_readwrite("max_prefill_chunk", &SchedulerConfig::max_prefill_chunk);

  py::class_<ScheduledSeq>(m, "ScheduledSeq")
      .def_readonly("seq_id", &ScheduledSeq::seq_id)
      .def_readonly("start", &ScheduledSeq::start)
      .def_readonly("num_tokens", &ScheduledSeq::num_tokens)
      .def_readonly("is_prefill", &ScheduledSeq::is_prefill)
      .def_readonly("block_ids", &ScheduledSeq::block_ids)
      .def_readonly("samples", &ScheduledSeq::samples)
      .def("__repr__", &repr_scheduled);

  py::class_<SchedulerOutput>(m, "SchedulerOutput")
      .def_readonly("scheduled", &SchedulerOutput::scheduled)
      .def_readonly("preempted", &SchedulerOutput::preempted)
      .def_readonly("finished", &SchedulerOutput::finished)
      .def_readonly("num_batched_tokens", &SchedulerOutput::num_batched_tokens);

  py::class_<Fork>(m, "Fork")
      .def_readonly("child", &Fork::child)
      .def_readonly("block_ids", &Fork::block_ids)
      .def_readonly("copy_src", &Fork::copy_src)
      .def_readonly("copy_dst", &Fork::copy_dst)
      .def_readonly("copy_rows", &Fork::copy_rows);

  py::class_<Scheduler>(m, "Scheduler", "Rollout scheduler (C++ twin of videocom_fast.rollout.scheduler).")
      .def(py::init<const SchedulerConfig&>(), py::arg("config"))
      .def_property_readonly("config", &Scheduler::config)
      .def("add_group", &Scheduler::add_group, py::arg("group_id"), py::arg("prompt_len"), py::arg("num_seqs"))
      .def("schedule", &Scheduler::schedule)
      .def("update", &Scheduler::update, py::arg("seq_id"), py::arg("num_computed"))
      .def("fork_ready", &Scheduler::fork_ready, py::arg("group_id"))
      .def("append_tokens", &Scheduler::append_tokens, py::arg("seq_id"), py::arg("n"))
      .def("await_observation", &Scheduler::await_observation, py::arg("seq_id"))
      .def("finish", &Scheduler::finish, py::arg("seq_id"))
      .def_property_readonly("num_free_blocks", &Scheduler::num_free_blocks)
      .def_property_readonly("num_waiting", &Scheduler::num_waiting)
      .def_property_readonly("num_running", &Scheduler::num_running)
      .def("seq_state", &Scheduler::seq_state, py::arg("seq_id"))
      .def("finish_reason", &Scheduler::finish_reason, py::arg("seq_id"))
      .def("num_tokens", &Scheduler::num_tokens, py::arg("seq_id"))
      .def("num_computed_tokens", &Scheduler::num_computed_tokens, py::arg("seq_id"))
      .def("block_table", &Scheduler::block_table, py::arg("seq_id"))
      .def("block_ref_count", &Scheduler::block_ref_count, py::arg("block_id"))
      .def("stats", &Scheduler::stats)
      .def("_corrupt_for_test", &Scheduler::corrupt_for_test, py::arg("kind"));
}
