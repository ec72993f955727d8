// Rollout scheduler (torch-free): each engine step, which sequences run and how many tokens each computes,
// under a token budget and a KV-block budget. The engine holds model, tokens and KV tensors; this holds only
// counts and block tables. The algorithm is explained once, at the top of Scheduler::schedule() in
// scheduler.cpp; the pure-Python twin videocom_fast/rollout/scheduler.py runs the same algorithm with the
// same block-allocation order, and tests/test_scheduler.py checks that both produce identical outputs.
//
// Errors: a bad argument throws std::invalid_argument (ValueError in Python, naming the argument); a broken
// invariant at the end of schedule() throws std::logic_error (RuntimeError).
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

namespace vcf::sched {

struct SchedulerConfig {
  int64_t max_num_batched_tokens = 2048;  // tokens computed per step (decodes + prefill chunks)
  int64_t max_num_seqs = 256;             // sequences holding KV at once
  int64_t block_size = 16;                // KV rows per block
  int64_t num_blocks = 4096;              // KV blocks in the pool
  int64_t max_prefill_chunk = 512;        // largest prefill chunk of one sequence in one step
};

struct ScheduledSeq {
  int64_t seq_id = 0;
  int64_t start = 0;        // tokens already in the KV; the chunk computes rows [start, start + num_tokens)
  int64_t num_tokens = 0;
  bool is_prefill = true;   // false: a 1-token decode
  std::vector<int64_t> block_ids;  // the whole block table after allocation
  bool samples = false;     // the chunk reaches the last known token
};

struct SchedulerOutput {
  std::vector<ScheduledSeq> scheduled;
  std::vector<int64_t> preempted;  // KV freed this step
  std::vector<int64_t> finished;   // finished by the scheduler ("kv_budget") this step
  int64_t num_batched_tokens = 0;
};

struct Fork {
  int64_t child = 0;
  std::vector<int64_t> block_ids;
  int64_t copy_src = -1;  // copy rows [0, copy_rows) of block copy_src into copy_dst; -1: nothing to copy
  int64_t copy_dst = -1;
  int64_t copy_rows = -1;
};

class Scheduler {
 public:
  explicit Scheduler(const SchedulerConfig& config);

  // engine calls
  std::vector<int64_t> add_group(int64_t group_id, int64_t prompt_len, int64_t num_seqs);
  SchedulerOutput schedule();
  void update(int64_t seq_id, int64_t num_computed);
  std::vector<Fork> fork_ready(int64_t group_id);
  void append_tokens(int64_t seq_id, int64_t n);
  void await_observation(int64_t seq_id);
  void finish(int64_t seq_id);

  // queries
  const SchedulerConfig& config() const { return cfg_; }
  int64_t num_free_blocks() const { return static_cast<int64_t>(free_.size()); }
  int64_t num_running() const { return static_cast<int64_t>(running_.size()); }
  int64_t num_waiting() const;
  std::string seq_state(int64_t seq_id) const;
  std::optional<std::string> finish_reason(int64_t seq_id) const;
  int64_t num_tokens(int64_t seq_id) const;
  int64_t num_computed_tokens(int64_t seq_id) const;
  std::vector<int64_t> block_table(int64_t seq_id) const;
  int64_t block_ref_count(int64_t block_id) const;
  std::map<std::string, int64_t> stats() const;

  void corrupt_for_test(const std::string& kind);  // test-only: break state so schedule() must throw

 private:
  struct Seq {
    int64_t seq_id = 0, group_id = 0;
    bool is_leader = false;
    int64_t num_tokens = 0, num_computed = 0;  // known tokens; of which in the KV
    std::vector<int64_t> block_ids;
    bool resident = false, awaiting_obs = false, awaiting_fork = false, finished = false;
    std::string finish_reason;
    int64_t sched_step = -1, sched_tokens = 0;  // last step that scheduled it; tokens not yet updated
    bool decode = false;  // its one pending token was just sampled (not a prompt remainder)
  };
  struct Group {
    int64_t group_id = 0, prompt_len = 0, leader = 0;
    std::vector<int64_t> pending;  // followers awaiting their fork
  };

  Seq& get(int64_t seq_id, const char* what);
  const Seq& get(int64_t seq_id, const char* what) const;
  void check_live(const Seq& s, const char* what) const;
  int64_t blocks_for(int64_t rows) const { return (rows + cfg_.block_size - 1) / cfg_.block_size; }
  int64_t alloc();
  void free_blocks(Seq& s);
  void evict(Seq& s);
  void preempt(Seq& s, SchedulerOutput& out);
  void finish_seq(Seq& s, const char* reason);
  void release_followers(Group& g);
  bool too_big(Seq& s, SchedulerOutput& out);
  int64_t make_room(Seq& s, int64_t n, bool shrink, SchedulerOutput& out);
  int64_t schedule_chunk(Seq& s, int64_t n, bool is_prefill, SchedulerOutput& out);
  void check_invariants(const SchedulerOutput& out) const;

  SchedulerConfig cfg_;
  std::deque<int64_t> free_;   // FIFO: allocate at the front, release at the back
  std::vector<int64_t> ref_;   // reference count per block
  std::vector<Seq> seqs_;      // indexed by seq id
  std::vector<Group> groups_;  // creation order
  std::unordered_map<int64_t, size_t> group_index_;
  std::vector<int64_t> forking_;  // group ids with followers awaiting their fork, creation order
  std::vector<int64_t> running_;  // resident seq ids, admission order (back = most recent)
  std::deque<int64_t> waiting_;
  int64_t reserved_ = 0;          // seats held for followers of resident leaders
  int64_t step_ = 0;
  int64_t limit_tokens_, limit_seqs_;  // what the invariant check compares with (test hook lowers them)
  struct Counters {
    int64_t num_steps = 0, num_scheduled_tokens = 0, num_prefill_tokens = 0, num_decode_tokens = 0,
            num_preemptions = 0, num_forks = 0, num_fork_fallbacks = 0, num_kv_budget_finishes = 0;
  } stats_;
};

}  // namespace vcf::sched
