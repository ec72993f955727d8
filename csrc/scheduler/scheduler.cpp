// Rollout scheduler: the algorithm (see scheduler.h for the data, Scheduler::schedule() for the method).
// Every decision mirrors videocom_fast/rollout/scheduler.py line for line, so the twins stay identical.
#include "scheduler/scheduler.h"

#include <algorithm>
#include <stdexcept>

namespace vcf::sched {

namespace {

std::invalid_argument bad(const std::string& msg) { return std::invalid_argument(msg); }

void require_at_least(const char* name, int64_t value, int64_t low) {
  if (value < low)
    throw bad(std::string(name) + " must be >= " + std::to_string(low) + ", got " + std::to_string(value));
}

template <class C>
void erase_value(C& c, int64_t v) {
  auto it = std::find(c.begin(), c.end(), v);
  if (it != c.end()) c.erase(it);
}

}  // namespace

Scheduler::Scheduler(const SchedulerConfig& config) : cfg_(config) {
  require_at_least("config.max_num_batched_tokens", cfg_.max_num_batched_tokens, 1);
  require_at_least("config.max_num_seqs", cfg_.max_num_seqs, 1);
  require_at_least("config.block_size", cfg_.block_size, 1);
  require_at_least("config.num_blocks", cfg_.num_blocks, 1);
  require_at_least("config.max_prefill_chunk", cfg_.max_prefill_chunk, 1);
  for (int64_t b = 0; b < cfg_.num_blocks; ++b) free_.push_back(b);
  ref_.assign(static_cast<size_t>(cfg_.num_blocks), 0);
  limit_tokens_ = cfg_.max_num_batched_tokens;
  limit_seqs_ = cfg_.max_num_seqs;
}

// --- queries -------------------------------------------------------------------------------------------

Scheduler::Seq& Scheduler::get(int64_t seq_id, const char* what) {
  if (seq_id < 0 || seq_id >= static_cast<int64_t>(seqs_.size()))
    throw bad(std::string(what) + ": unknown seq_id " + std::to_string(seq_id));
  return seqs_[static_cast<size_t>(seq_id)];
}

const Scheduler::Seq& Scheduler::get(int64_t seq_id, const char* what) const {
  return const_cast<Scheduler*>(this)->get(seq_id, what);
}

void Scheduler::check_live(const Seq& s, const char* what) const {
  if (s.finished) throw bad(std::string(what) + ": seq " + std::to_string(s.seq_id) + " is finished");
  if (s.awaiting_fork)
    throw bad(std::string(what) + ": seq " + std::to_string(s.seq_id) +
              " is awaiting its fork (its first token comes with fork_ready)");
}

int64_t Scheduler::num_waiting() const {
  int64_t n = 0;
  for (const Seq& s : seqs_) n += (!s.resident && !s.finished);
  return n;
}

std::string Scheduler::seq_state(int64_t seq_id) const {
  const Seq& s = get(seq_id, "seq_state");
  if (s.finished) return "finished";
  if (s.awaiting_fork) return "awaiting_fork";
  if (s.awaiting_obs) return "awaiting_observation";
  return s.resident ? "running" : "waiting";
}

std::optional<std::string> Scheduler::finish_reason(int64_t seq_id) const {
  const Seq& s = get(seq_id, "finish_reason");
  if (!s.finished) return std::nullopt;
  return s.finish_reason;
}

int64_t Scheduler::num_tokens(int64_t seq_id) const { return get(seq_id, "num_tokens").num_tokens; }

int64_t Scheduler::num_computed_tokens(int64_t seq_id) const {
  return get(seq_id, "num_computed_tokens").num_computed;
}

std::vector<int64_t> Scheduler::block_table(int64_t seq_id) const { return get(seq_id, "block_table").block_ids; }

int64_t Scheduler::block_ref_count(int64_t block_id) const {
  if (block_id < 0 || block_id >= cfg_.num_blocks)
    throw bad("block_ref_count: block_id " + std::to_string(block_id) + " out of range [0, " +
              std::to_string(cfg_.num_blocks) + ")");
  return ref_[static_cast<size_t>(block_id)];
}

std::map<std::string, int64_t> Scheduler::stats() const {
  const Counters& c = stats_;
  std::map<std::string, int64_t> out{
      {"num_steps", c.num_steps}, {"num_scheduled_tokens", c.num_scheduled_tokens},
      {"num_prefill_tokens", c.num_prefill_tokens}, {"num_decode_tokens", c.num_decode_tokens},
      {"num_preemptions", c.num_preemptions}, {"num_forks", c.num_forks},
      {"num_fork_fallbacks", c.num_fork_fallbacks}, {"num_kv_budget_finishes", c.num_kv_budget_finishes}};
  out["num_free_blocks"] = num_free_blocks();
  out["num_running"] = num_running();
  out["num_waiting"] = num_waiting();
  int64_t finished = 0;
  for (const Seq& s : seqs_) finished += s.finished;
  out["num_finished"] = finished;
  return out;
}

// --- engine calls --------------------------------------------------------------------------------------

std::vector<int64_t> Scheduler::add_group(int64_t group_id, int64_t prompt_len, int64_t num_seqs) {
  require_at_least("prompt_len", prompt_len, 1);
  require_at_least("num_seqs", num_seqs, 1);
  if (group_index_.count(group_id)) throw bad("add_group: duplicate group_id " + std::to_string(group_id));
  std::vector<int64_t> ids;
  for (int64_t i = 0; i < num_seqs; ++i) {
    Seq s;
    s.seq_id = static_cast<int64_t>(seqs_.size());
    s.group_id = group_id;
    s.is_leader = (i == 0);
    s.num_tokens = prompt_len;
    s.awaiting_fork = !s.is_leader;
    ids.push_back(s.seq_id);
    seqs_.push_back(std::move(s));
  }
  Group g;
  g.group_id = group_id;
  g.prompt_len = prompt_len;
  g.leader = ids[0];
  g.pending.assign(ids.begin() + 1, ids.end());
  group_index_[group_id] = groups_.size();
  groups_.push_back(std::move(g));
  if (num_seqs > 1) forking_.push_back(group_id);
  waiting_.push_back(ids[0]);
  return ids;
}

void Scheduler::update(int64_t seq_id, int64_t num_computed) {
  Seq& s = get(seq_id, "update");
  require_at_least("num_computed", num_computed, 1);
  if (s.finished || s.sched_step != step_ || s.sched_tokens == 0)
    throw bad("update: seq " + std::to_string(seq_id) + " has no chunk awaiting update from the last schedule()");
  if (num_computed > s.sched_tokens)
    throw bad("update: num_computed=" + std::to_string(num_computed) + " > " + std::to_string(s.sched_tokens) +
              " tokens scheduled for seq " + std::to_string(seq_id) +
              " (pass the chunk's token count, not the total)");
  s.num_computed += num_computed;
  s.sched_tokens = 0;
}

std::vector<Fork> Scheduler::fork_ready(int64_t group_id) {
  auto it = group_index_.find(group_id);
  if (it == group_index_.end()) throw bad("fork_ready: unknown group_id " + std::to_string(group_id));
  Group& g = groups_[it->second];
  std::vector<Fork> forks;
  if (g.pending.empty()) return forks;
  Seq& leader = seqs_[static_cast<size_t>(g.leader)];
  if (leader.finished) {
    release_followers(g);
    return forks;
  }
  if (!leader.resident || leader.num_computed < g.prompt_len) return forks;
  const int64_t full = g.prompt_len / cfg_.block_size, rows = g.prompt_len % cfg_.block_size;
  std::vector<int64_t> fallback;
  reserved_ -= static_cast<int64_t>(g.pending.size());
  for (int64_t cid : g.pending) {
    Seq& child = seqs_[static_cast<size_t>(cid)];
    child.awaiting_fork = false;
    if (num_running() >= cfg_.max_num_seqs || (rows && free_.empty())) {
      fallback.push_back(cid);
      continue;
    }
    child.block_ids.assign(leader.block_ids.begin(), leader.block_ids.begin() + full);
    for (int64_t b : child.block_ids) ref_[static_cast<size_t>(b)] += 1;
    Fork f;
    f.child = cid;
    if (rows) {
      f.copy_src = leader.block_ids[static_cast<size_t>(full)];
      f.copy_dst = alloc();
      f.copy_rows = rows;
      child.block_ids.push_back(f.copy_dst);
    }
    child.num_computed = g.prompt_len;
    child.resident = true;
    running_.push_back(cid);
    f.block_ids = child.block_ids;
    forks.push_back(std::move(f));
  }
  g.pending.clear();
  erase_value(forking_, group_id);
  stats_.num_forks += static_cast<int64_t>(forks.size());
  stats_.num_fork_fallbacks += static_cast<int64_t>(fallback.size());
  waiting_.insert(waiting_.begin(), fallback.begin(), fallback.end());
  return forks;
}

void Scheduler::append_tokens(int64_t seq_id, int64_t n) {
  Seq& s = get(seq_id, "append_tokens");
  require_at_least("n", n, 1);
  check_live(s, "append_tokens");
  s.decode = n == 1 && s.num_tokens == s.num_computed;  // a token sampled from its last computed row
  s.num_tokens += n;
  s.awaiting_obs = false;
}

void Scheduler::await_observation(int64_t seq_id) {
  Seq& s = get(seq_id, "await_observation");
  check_live(s, "await_observation");
  s.awaiting_obs = true;
}

void Scheduler::finish(int64_t seq_id) {
  Seq& s = get(seq_id, "finish");
  if (!s.finished) finish_seq(s, "finished");
}

// --- the algorithm -------------------------------------------------------------------------------------

// One engine step.
// 0. Followers whose leader finished, or whose leader's prompt is computed but was never forked, stop waiting
//    for it and recompute their prompt themselves (so nothing waits forever).
// 1. Decodes first (1 token each: the token the engine just sampled), running sequences in admission order:
//    they keep moving.
// 2. Prefill chunks of running sequences (observations, or a prompt mid-way), admission order, each at most
//    max_prefill_chunk tokens and the remaining budget. A chunk short of KV blocks shrinks to the free rows;
//    with no free row left it preempts the most recently admitted resident sequence not scheduled this step
//    (possibly itself: then it waits) until it fits.
// 3. Waiting sequences, FCFS (preempted ones at the front), while the budget lasts, a seat is free (a leader
//    also needs seats for its followers) and its first chunk's blocks are free. Admission never preempts,
//    and is skipped in a step that preempted (a victim would be re-admitted at once).
// A sequence whose known tokens need more blocks than the whole pool is finished ("kv_budget").
// Ends by checking the invariants (std::logic_error if broken).
SchedulerOutput Scheduler::schedule() {
  step_ += 1;
  SchedulerOutput out;
  for (int64_t gid : std::vector<int64_t>(forking_)) {
    Group& g = groups_[group_index_.at(gid)];
    const Seq& leader = seqs_[static_cast<size_t>(g.leader)];
    if (leader.finished || (leader.resident && leader.num_computed >= g.prompt_len)) release_followers(g);
  }
  int64_t budget = cfg_.max_num_batched_tokens;
  for (bool decode_phase : {true, false}) {
    for (int64_t sid : std::vector<int64_t>(running_)) {
      if (budget == 0) break;
      Seq& s = seqs_[static_cast<size_t>(sid)];
      const int64_t pending = s.num_tokens - s.num_computed;
      if (!s.resident || s.awaiting_obs || pending == 0) continue;
      const bool is_decode = pending == 1 && s.decode;
      if (is_decode != decode_phase) continue;
      if (too_big(s, out)) continue;
      int64_t n = is_decode ? 1 : std::min({pending, cfg_.max_prefill_chunk, budget});
      n = make_room(s, n, !is_decode, out);
      if (n) budget -= schedule_chunk(s, n, !is_decode, out);
    }
  }
  size_t i = 0;
  while (budget > 0 && out.preempted.empty() && i < waiting_.size()) {
    Seq& s = seqs_[static_cast<size_t>(waiting_[i])];
    if (s.awaiting_obs) {
      ++i;
      continue;
    }
    if (too_big(s, out)) {  // removed from waiting; may have put followers at the front
      i = 0;
      continue;
    }
    const Group& g = groups_[group_index_.at(s.group_id)];
    const int64_t seats = 1 + (s.is_leader ? static_cast<int64_t>(g.pending.size()) : 0);
    if (!running_.empty() && num_running() + reserved_ + seats > cfg_.max_num_seqs) break;
    const int64_t n = std::min({s.num_tokens, cfg_.max_prefill_chunk, budget});
    if (blocks_for(n) > num_free_blocks()) break;
    waiting_.erase(waiting_.begin() + static_cast<std::ptrdiff_t>(i));
    s.resident = true;
    running_.push_back(s.seq_id);
    reserved_ += seats - 1;
    budget -= schedule_chunk(s, n, true, out);
  }
  stats_.num_steps += 1;
  check_invariants(out);
  return out;
}

int64_t Scheduler::schedule_chunk(Seq& s, int64_t n, bool is_prefill, SchedulerOutput& out) {
  const int64_t start = s.num_computed;
  for (int64_t k = blocks_for(start + n) - static_cast<int64_t>(s.block_ids.size()); k > 0; --k)
    s.block_ids.push_back(alloc());
  ScheduledSeq c;
  c.seq_id = s.seq_id;
  c.start = start;
  c.num_tokens = n;
  c.is_prefill = is_prefill;
  c.block_ids = s.block_ids;
  c.samples = start + n == s.num_tokens;
  out.scheduled.push_back(std::move(c));
  out.num_batched_tokens += n;
  s.sched_step = step_;
  s.sched_tokens = n;
  stats_.num_scheduled_tokens += n;
  (is_prefill ? stats_.num_prefill_tokens : stats_.num_decode_tokens) += n;
  return n;
}

// Tokens of `s` that fit after preempting as needed (0: `s` itself was preempted).
int64_t Scheduler::make_room(Seq& s, int64_t n, bool shrink, SchedulerOutput& out) {
  while (true) {
    const int64_t cap = (static_cast<int64_t>(s.block_ids.size()) + num_free_blocks()) * cfg_.block_size -
                        s.num_computed;
    if (cap >= n) return n;
    if (shrink && cap >= 1) return cap;
    Seq* victim = nullptr;  // `s` itself always qualifies, so one is found
    for (auto it = running_.rbegin(); it != running_.rend(); ++it) {
      Seq& v = seqs_[static_cast<size_t>(*it)];
      if (v.sched_step != step_) {
        victim = &v;
        break;
      }
    }
    if (victim == nullptr) throw std::logic_error("scheduler invariant violated: no preemption victim");
    preempt(*victim, out);
    if (victim == &s) return 0;
  }
}

bool Scheduler::too_big(Seq& s, SchedulerOutput& out) {
  if (blocks_for(s.num_tokens) <= cfg_.num_blocks) return false;
  finish_seq(s, "kv_budget");
  out.finished.push_back(s.seq_id);
  stats_.num_kv_budget_finishes += 1;
  return true;
}

// --- block and queue bookkeeping -----------------------------------------------------------------------

int64_t Scheduler::alloc() {
  const int64_t b = free_.front();
  free_.pop_front();
  ref_[static_cast<size_t>(b)] = 1;
  return b;
}

void Scheduler::free_blocks(Seq& s) {
  for (int64_t b : s.block_ids)
    if (--ref_[static_cast<size_t>(b)] == 0) free_.push_back(b);
  s.block_ids.clear();
}

// Drop `s`'s KV and its seat (and the seats its leader reserved).
void Scheduler::evict(Seq& s) {
  free_blocks(s);
  s.resident = false;
  s.num_computed = 0;
  s.decode = false;
  erase_value(running_, s.seq_id);
  if (s.is_leader) reserved_ -= static_cast<int64_t>(groups_[group_index_.at(s.group_id)].pending.size());
}

void Scheduler::preempt(Seq& s, SchedulerOutput& out) {
  evict(s);
  waiting_.push_front(s.seq_id);
  out.preempted.push_back(s.seq_id);
  stats_.num_preemptions += 1;
}

void Scheduler::finish_seq(Seq& s, const char* reason) {
  if (s.resident) {
    evict(s);
  } else if (s.awaiting_fork) {
    Group& g = groups_[group_index_.at(s.group_id)];
    erase_value(g.pending, s.seq_id);
    if (seqs_[static_cast<size_t>(g.leader)].resident) reserved_ -= 1;
    if (g.pending.empty()) erase_value(forking_, g.group_id);
    s.awaiting_fork = false;
  } else {
    erase_value(waiting_, s.seq_id);
  }
  s.finished = true;
  s.finish_reason = reason;
  s.sched_tokens = 0;
  if (s.is_leader) {
    Group& g = groups_[group_index_.at(s.group_id)];
    if (!g.pending.empty()) release_followers(g);
  }
}

// Followers stop waiting for the leader: each recomputes the prompt itself (front of the queue).
void Scheduler::release_followers(Group& g) {
  if (seqs_[static_cast<size_t>(g.leader)].resident) reserved_ -= static_cast<int64_t>(g.pending.size());
  for (int64_t cid : g.pending) seqs_[static_cast<size_t>(cid)].awaiting_fork = false;
  waiting_.insert(waiting_.begin(), g.pending.begin(), g.pending.end());
  stats_.num_fork_fallbacks += static_cast<int64_t>(g.pending.size());
  g.pending.clear();
  erase_value(forking_, g.group_id);
}

// --- invariants ----------------------------------------------------------------------------------------

void Scheduler::check_invariants(const SchedulerOutput& out) const {
  auto fail = [](const std::string& msg) { throw std::logic_error("scheduler invariant violated: " + msg); };
  if (out.num_batched_tokens > limit_tokens_)
    fail(std::to_string(out.num_batched_tokens) + " tokens scheduled > budget " + std::to_string(limit_tokens_));
  int64_t sum = 0;
  for (const ScheduledSeq& c : out.scheduled) sum += c.num_tokens;
  if (sum != out.num_batched_tokens) fail("num_batched_tokens != sum of scheduled chunks");
  if (num_running() > limit_seqs_)
    fail(std::to_string(num_running()) + " running > max_num_seqs " + std::to_string(limit_seqs_));
  std::vector<int64_t> counts(ref_.size(), 0);
  for (int64_t sid : running_)
    for (int64_t b : seqs_[static_cast<size_t>(sid)].block_ids) counts[static_cast<size_t>(b)] += 1;
  if (counts != ref_) fail("block reference counts differ from the block tables");
  int64_t used = 0;
  for (int64_t r : ref_) used += (r > 0);
  bool free_in_use = false;
  for (int64_t b : free_) free_in_use |= ref_[static_cast<size_t>(b)] != 0;
  if (used + num_free_blocks() != cfg_.num_blocks || free_in_use)
    fail("free (" + std::to_string(num_free_blocks()) + ") + used (" + std::to_string(used) +
         ") != num_blocks (" + std::to_string(cfg_.num_blocks) + ")");
  for (const ScheduledSeq& c : out.scheduled)
    if (static_cast<int64_t>(seqs_[static_cast<size_t>(c.seq_id)].block_ids.size()) * cfg_.block_size <
        c.start + c.num_tokens)
      fail("seq " + std::to_string(c.seq_id) + ": block table too short for its chunk");
}

void Scheduler::corrupt_for_test(const std::string& kind) {
  if (kind == "refcount") {
    ref_[0] += 1;
  } else if (kind == "free_list") {
    if (!free_.empty()) free_.pop_back();
  } else if (kind == "budget") {
    limit_tokens_ = 0;
  } else if (kind == "max_num_seqs") {
    limit_seqs_ = -1;
  } else {
    throw bad("_corrupt_for_test: unknown kind '" + kind + "'");
  }
}

}  // namespace vcf::sched
