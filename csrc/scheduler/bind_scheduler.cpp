// Python bindings of the rollout scheduler (videocom_fast._C.Scheduler and its plain-data results), with
// the same names and fields as the Python twin in videocom_fast/rollout/scheduler.py. Argument checks live
// in the core and throw std::invalid_argument, which pybind11 turns into ValueError; invariant failures are
// std::logic_error -> RuntimeError.
//
// Crossing into Python costs more than scheduling (measured for 256 decodes with ~95-block tables:
// schedule() 70 us; pybind11 struct wrappers + int lists 280 us), hence two measures below: block ids come
// from an interned table of Python ints, and ScheduledSeq is a PyStructSequence built eagerly.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <stdexcept>

#include "scheduler/scheduler.h"

namespace py = pybind11;
using namespace vcf::sched;

namespace {

// Block ids as Python ints from one interned table (grown on demand, never freed): a table of ~100 ids
// costs ~100 increfs instead of ~100 int allocations.
py::list block_list(const std::vector<int64_t>& ids) {
  static auto* interned = new std::vector<PyObject*>();
  py::list out(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    const auto id = static_cast<size_t>(ids[i]);
    while (interned->size() <= id) {
      PyObject* o = PyLong_FromSsize_t(static_cast<Py_ssize_t>(interned->size()));
      if (o == nullptr) throw py::error_already_set();
      interned->push_back(o);
    }
    PyObject* o = (*interned)[id];
    Py_INCREF(o);
    PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(i), o);
  }
  return out;
}

// ScheduledSeq is a PyStructSequence (a named tuple made in C): fields by name like the Python twin's
// dataclass, one cheap object per chunk (a pybind11 wrapper per chunk cost 0.7 us).
PyTypeObject* scheduled_seq_type = nullptr;

PyStructSequence_Field scheduled_seq_fields[] = {
    {"seq_id", "sequence id"},
    {"start", "tokens already in the KV; the chunk computes rows [start, start + num_tokens)"},
    {"num_tokens", "tokens computed by this chunk"},
    {"is_prefill", "False: a 1-token decode of the token the engine just sampled"},
    {"block_ids", "the sequence's whole block table after allocation"},
    {"samples", "the chunk reaches the last known token: sample the next one from its last row"},
    {nullptr, nullptr}};

PyStructSequence_Desc scheduled_seq_desc = {"videocom_fast._C.ScheduledSeq",
                                            "One sequence's chunk in a scheduler step.", scheduled_seq_fields, 6};

py::object to_python(const ScheduledSeq& c) {
  PyObject* o = PyStructSequence_New(scheduled_seq_type);
  if (o == nullptr) throw py::error_already_set();
  PyStructSequence_SetItem(o, 0, PyLong_FromLongLong(c.seq_id));
  PyStructSequence_SetItem(o, 1, PyLong_FromLongLong(c.start));
  PyStructSequence_SetItem(o, 2, PyLong_FromLongLong(c.num_tokens));
  PyStructSequence_SetItem(o, 3, py::bool_(c.is_prefill).release().ptr());
  PyStructSequence_SetItem(o, 4, block_list(c.block_ids).release().ptr());
  PyStructSequence_SetItem(o, 5, py::bool_(c.samples).release().ptr());
  return py::reinterpret_steal<py::object>(o);
}

// What schedule() returns to Python: lists built once, so attribute reads are free.
struct PyOutput {
  py::list scheduled, preempted, finished;
  int64_t num_batched_tokens = 0;
};

PyOutput to_python(const SchedulerOutput& out) {
  PyOutput r;
  r.scheduled = py::list(out.scheduled.size());
  for (size_t i = 0; i < out.scheduled.size(); ++i)
    PyList_SET_ITEM(r.scheduled.ptr(), static_cast<Py_ssize_t>(i), to_python(out.scheduled[i]).release().ptr());
  r.preempted = py::cast(out.preempted);
  r.finished = py::cast(out.finished);
  r.num_batched_tokens = out.num_batched_tokens;
  return r;
}

// The same step as flat arrays (schedule_arrays): no Python object per chunk or per block id. Legend: C
// scheduled chunks; table_off (C + 1,) indexes table_ids, the concatenated block tables (CSR).
using I64 = py::array_t<int64_t>;
using Flags = py::array_t<bool>;

struct PyArrays {
  I64 seq_ids, starts, num_tokens, table_off, table_ids;
  Flags is_prefill, samples;
  py::list preempted, finished;
  int64_t num_batched_tokens = 0;
};

PyArrays to_arrays(const SchedulerOutput& out) {
  const auto C = static_cast<py::ssize_t>(out.scheduled.size());
  py::ssize_t nt = 0;
  for (const auto& c : out.scheduled) nt += static_cast<py::ssize_t>(c.block_ids.size());
  PyArrays r{I64(C), I64(C), I64(C), I64(C + 1), I64(nt), Flags(C), Flags(C), py::list(), py::list(), 0};
  auto id = r.seq_ids.mutable_unchecked<1>(), st = r.starts.mutable_unchecked<1>(),
       n = r.num_tokens.mutable_unchecked<1>(), off = r.table_off.mutable_unchecked<1>();
  auto pre = r.is_prefill.mutable_unchecked<1>(), smp = r.samples.mutable_unchecked<1>();
  int64_t* tab = r.table_ids.mutable_data();
  off(0) = 0;
  for (py::ssize_t i = 0; i < C; ++i) {
    const auto& c = out.scheduled[static_cast<size_t>(i)];
    id(i) = c.seq_id;
    st(i) = c.start;
    n(i) = c.num_tokens;
    pre(i) = c.is_prefill;
    smp(i) = c.samples;
    std::copy(c.block_ids.begin(), c.block_ids.end(), tab + off(i));
    off(i + 1) = off(i) + static_cast<int64_t>(c.block_ids.size());
  }
  r.preempted = py::cast(out.preempted);
  r.finished = py::cast(out.finished);
  r.num_batched_tokens = out.num_batched_tokens;
  return r;
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

  if (scheduled_seq_type == nullptr) {
    scheduled_seq_type = PyStructSequence_NewType(&scheduled_seq_desc);
    if (scheduled_seq_type == nullptr) throw py::error_already_set();
  }
  m.attr("ScheduledSeq") = py::handle(reinterpret_cast<PyObject*>(scheduled_seq_type));

  py::class_<PyOutput>(m, "SchedulerOutput")
      .def_readonly("scheduled", &PyOutput::scheduled)
      .def_readonly("preempted", &PyOutput::preempted)
      .def_readonly("finished", &PyOutput::finished)
      .def_readonly("num_batched_tokens", &PyOutput::num_batched_tokens);

  py::class_<PyArrays>(m, "ScheduleArrays", "One step as flat arrays (see Scheduler.schedule_arrays).")
      .def_readonly("seq_ids", &PyArrays::seq_ids)
      .def_readonly("starts", &PyArrays::starts)
      .def_readonly("num_tokens", &PyArrays::num_tokens)
      .def_readonly("is_prefill", &PyArrays::is_prefill)
      .def_readonly("samples", &PyArrays::samples)
      .def_readonly("table_off", &PyArrays::table_off)
      .def_readonly("table_ids", &PyArrays::table_ids)
      .def_readonly("preempted", &PyArrays::preempted)
      .def_readonly("finished", &PyArrays::finished)
      .def_readonly("num_batched_tokens", &PyArrays::num_batched_tokens);

  py::class_<Fork>(m, "Fork")
      .def_readonly("child", &Fork::child)
      .def_property_readonly("block_ids", [](const Fork& f) { return block_list(f.block_ids); })
      .def_readonly("copy_src", &Fork::copy_src)
      .def_readonly("copy_dst", &Fork::copy_dst)
      .def_readonly("copy_rows", &Fork::copy_rows);

  py::class_<Scheduler>(m, "Scheduler", "Rollout scheduler (C++ twin of videocom_fast.rollout.scheduler).")
      .def(py::init<const SchedulerConfig&>(), py::arg("config"))
      .def_property_readonly("config", &Scheduler::config)
      .def("add_group", &Scheduler::add_group, py::arg("group_id"), py::arg("prompt_len"), py::arg("num_seqs"))
      .def("schedule", [](Scheduler& s) { return to_python(s.schedule()); })
      .def("schedule_arrays", [](Scheduler& s) { return to_arrays(s.schedule()); },
           "schedule() as flat arrays: seq_ids, starts, num_tokens, is_prefill, samples (C,), the block tables "
           "concatenated in table_ids with table_off (C + 1,), preempted, finished, num_batched_tokens.")
      .def("update", &Scheduler::update, py::arg("seq_id"), py::arg("num_computed"))
      .def("update_many",
           [](Scheduler& s, const I64& seq_ids, const I64& num_computed) {
             if (seq_ids.ndim() != 1 || num_computed.ndim() != 1 || seq_ids.shape(0) != num_computed.shape(0))
               throw std::invalid_argument("update_many: seq_ids and num_computed must be 1-d of one length");
             auto id = seq_ids.unchecked<1>();
             auto n = num_computed.unchecked<1>();
             for (py::ssize_t i = 0; i < id.shape(0); ++i) s.update(id(i), n(i));
           },
           py::arg("seq_ids"), py::arg("num_computed"), "update(seq_ids[i], num_computed[i]) for each i.")
      .def("fork_ready", &Scheduler::fork_ready, py::arg("group_id"))
      .def("append_tokens", &Scheduler::append_tokens, py::arg("seq_id"), py::arg("n"))
      .def("append_one_each",
           [](Scheduler& s, const I64& seq_ids) {
             if (seq_ids.ndim() != 1) throw std::invalid_argument("append_one_each: seq_ids must be 1-d");
             auto id = seq_ids.unchecked<1>();
             for (py::ssize_t i = 0; i < id.shape(0); ++i) s.append_tokens(id(i), 1);
           },
           py::arg("seq_ids"), "append_tokens(seq_id, 1) for each id (one call for a step's sampled tokens).")
      .def("await_observation", &Scheduler::await_observation, py::arg("seq_id"))
      .def("finish", &Scheduler::finish, py::arg("seq_id"))
      .def_property_readonly("num_free_blocks", &Scheduler::num_free_blocks)
      .def_property_readonly("num_waiting", &Scheduler::num_waiting)
      .def_property_readonly("num_running", &Scheduler::num_running)
      .def("seq_state", &Scheduler::seq_state, py::arg("seq_id"))
      .def("finish_reason", &Scheduler::finish_reason, py::arg("seq_id"))
      .def("num_tokens", &Scheduler::num_tokens, py::arg("seq_id"))
      .def("num_computed_tokens", &Scheduler::num_computed_tokens, py::arg("seq_id"))
      .def("block_table", [](const Scheduler& s, int64_t seq_id) { return block_list(s.block_table(seq_id)); },
           py::arg("seq_id"))
      .def("block_ref_count", &Scheduler::block_ref_count, py::arg("block_id"))
      .def("stats", &Scheduler::stats)
      .def("_corrupt_for_test", &Scheduler::corrupt_for_test, py::arg("kind"));
}
