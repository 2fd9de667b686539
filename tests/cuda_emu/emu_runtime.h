// A host emulator of the CUDA execution model, so that the kernels of csrc/cuda/ run (slowly) on
// the CPU in tests, on machines without a GPU. Force-included (-include) before every translated
// .cu file; see tests/cuda_emu/build.py for the translation and README.md beside it for the limits.
//
// Every CUDA thread of a block is a fiber (ucontext) with its own stack; blocks run one after
// another. A fiber runs until it reaches a barrier (__syncthreads, or a warp operation such as
// __shfl_xor_sync / __ballot_sync), so shared memory written before a barrier is seen after it, and
// a missing barrier shows up as a wrong result under the shuffled schedules. The emulator reports,
// as a c10::Error from the launch, what real hardware would hang or fail on: a __syncthreads that
// not every live thread of the block reaches (or reaches at different places), a warp operation
// whose mask names a lane that has exited or does not exist, a launch configuration the hardware
// refuses, and failed CUDA_KERNEL_ASSERTs.
//
// Threads and blocks run in a pseudo-random order, reshuffled at every barrier, seeded by the
// environment variable PYIMPUTMAE_CUDA_EMU_SEED (default 0), so that order-dependent kernels fail.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---- CUDA's built-in types -------------------------------------------------------------------
struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
using cudaStream_t = struct CUstream_st*;

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // one block runs at a time, so a static is that block's shared memory

namespace emu {

[[noreturn]] inline void fail(const std::string& what) { TORCH_CHECK(false, "CUDA emulator: ", what); }

struct Error {
  std::string message;  // first problem seen in the current launch, empty if none
};
inline thread_local Error pending_error;

inline void report(const std::string& what) {
  if (pending_error.message.empty()) pending_error.message = what;
}

enum class State { Runnable, BlockBarrier, WarpBarrier, Done };

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  State state = State::Runnable;
  uint3 index;
  int linear = 0;            // threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)
  const char* where = "";    // file:line of the barrier it waits at
  unsigned warp_mask = 0;    // mask of the warp operation it waits at
};

constexpr size_t kStackBytes = 128 * 1024;

struct Scheduler {
  std::vector<Fiber> fibers;  // grown, never shrunk: stacks are reused across blocks and launches
  ucontext_t home;
  int current = -1;
  uint64_t rng = 0;
  std::vector<uint64_t> warp_slots;  // 32 values per warp, for the warp operations
  std::function<void()> body;

  uint64_t next_random() {  // xorshift64*
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return rng * 0x2545F4914F6CDD1DULL;
  }
  template <typename V>
  void shuffle(V& v) {
    for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[next_random() % i]);
  }
};

inline Scheduler& scheduler() {
  static thread_local Scheduler s;
  return s;
}

inline Fiber& me() { return scheduler().fibers[static_cast<size_t>(scheduler().current)]; }

inline void yield_to_scheduler() {
  Scheduler& s = scheduler();
  swapcontext(&s.fibers[static_cast<size_t>(s.current)].context, &s.home);
}

extern "C" inline void fiber_entry() {
  Scheduler& s = scheduler();
  s.body();
  s.fibers[static_cast<size_t>(s.current)].state = State::Done;
  // returning resumes uc_link, the scheduler
}

inline void syncthreads(const char* where) {
  Fiber& f = me();
  f.state = State::BlockBarrier;
  f.where = where;
  yield_to_scheduler();
}

inline void warp_barrier(unsigned mask, const char* where) {
  Fiber& f = me();
  f.state = State::WarpBarrier;
  f.where = where;
  f.warp_mask = mask;
  yield_to_scheduler();
}

inline uint64_t& warp_slot(int linear) { return scheduler().warp_slots[static_cast<size_t>(linear)]; }

inline std::string describe(const Fiber& f) {
  std::ostringstream os;
  os << "thread (" << f.index.x << "," << f.index.y << "," << f.index.z << ") of block (" << blockIdx.x << ","
     << blockIdx.y << "," << blockIdx.z << ")";
  return os.str();
}

// A warp operation completes once every live lane of the warp has reached it: then those lanes
// become runnable again (true); false when some live lane is elsewhere or none waits.
inline bool release_warp(int first, int last, const char* kernel) {
  Scheduler& s = scheduler();
  bool any_waiting = false, all_waiting = true;
  unsigned live = 0;
  const Fiber* leader = nullptr;
  for (int t = first; t < last; ++t) {
    const Fiber& f = s.fibers[static_cast<size_t>(t)];
    if (f.state == State::Done) continue;
    live |= 1u << (t - first);
    any_waiting |= f.state == State::WarpBarrier;
    all_waiting &= f.state == State::WarpBarrier;
    if (leader == nullptr) leader = &f;
  }
  if (!any_waiting || !all_waiting) return false;
  for (int t = first; t < last; ++t) {
    Fiber& f = s.fibers[static_cast<size_t>(t)];
    if (f.state != State::WarpBarrier) continue;
    if (f.warp_mask & ~live) {
      fail(std::string(kernel) + ": warp operation at " + f.where + " by " + describe(f) +
           " names lanes that have exited or do not exist (mask " + std::to_string(f.warp_mask) + ", live lanes " +
           std::to_string(live) + ")");
    }
    if (std::strcmp(f.where, leader->where) != 0) {
      fail(std::string(kernel) + ": lanes of one warp wait at different warp operations (" + f.where + " and " +
           leader->where + ")");
    }
    f.state = State::Runnable;
  }
  return true;
}

// Runs one block to completion; throws (through fail) on a hang real hardware would have.
inline void run_block(int threads, const char* kernel) {
  Scheduler& s = scheduler();
  if (s.fibers.size() < static_cast<size_t>(threads)) s.fibers.resize(static_cast<size_t>(threads));
  s.warp_slots.assign(static_cast<size_t>((threads + 31) / 32 * 32), 0);
  for (int t = 0; t < threads; ++t) {
    Fiber& f = s.fibers[static_cast<size_t>(t)];
    if (!f.stack) f.stack.reset(new char[kStackBytes]);
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &s.home;
    makecontext(&f.context, fiber_entry, 0);
    f.state = State::Runnable;
    f.linear = t;
    f.index.x = static_cast<unsigned>(t) % blockDim.x;
    f.index.y = static_cast<unsigned>(t) / blockDim.x % blockDim.y;
    f.index.z = static_cast<unsigned>(t) / (blockDim.x * blockDim.y);
    f.where = "";
  }
  const int warps = (threads + 31) / 32;
  std::vector<int> warp_order(static_cast<size_t>(warps)), lanes;
  for (int w = 0; w < warps; ++w) warp_order[static_cast<size_t>(w)] = w;
  for (;;) {
    // Warps progress independently, as on hardware: each in turn runs as far as it can (through
    // its warp operations) before the next starts, so a warp can race ahead to the next
    // __syncthreads while the others have not yet run; lanes run in a shuffled order.
    s.shuffle(warp_order);
    for (int w : warp_order) {
      const int first = w * 32, last = std::min(threads, first + 32);
      lanes.clear();
      for (int t = first; t < last; ++t) lanes.push_back(t);
      do {
        s.shuffle(lanes);
        for (int t : lanes) {
          Fiber& f = s.fibers[static_cast<size_t>(t)];
          if (f.state != State::Runnable) continue;
          s.current = t;
          threadIdx = f.index;
          swapcontext(&s.home, &f.context);
        }
        s.current = -1;
      } while (release_warp(first, last, kernel));
    }
    int live = 0, at_barrier = 0;
    const Fiber* first_waiting = nullptr;
    for (int t = 0; t < threads; ++t) {
      const Fiber& f = s.fibers[static_cast<size_t>(t)];
      if (f.state == State::Done) continue;
      ++live;
      if (f.state == State::BlockBarrier) {
        ++at_barrier;
        if (first_waiting == nullptr) first_waiting = &f;
      }
    }
    if (live == 0) return;
    if (at_barrier == live) {
      for (int t = 0; t < threads; ++t) {
        Fiber& f = s.fibers[static_cast<size_t>(t)];
        if (f.state != State::BlockBarrier) continue;
        if (std::strcmp(f.where, first_waiting->where) != 0) {
          fail(std::string(kernel) + ": threads of one block wait at different __syncthreads (" + f.where + " by " +
               describe(f) + ", " + first_waiting->where + " by " + describe(*first_waiting) + ")");
        }
        f.state = State::Runnable;
      }
      if (live < threads) {
        fail(std::string(kernel) + ": __syncthreads at " + first_waiting->where + " is reached after " +
             std::to_string(threads - live) + " threads of the block have returned");
      }
      continue;
    }
    std::ostringstream os;
    os << kernel << ": deadlock in block (" << blockIdx.x << "," << blockIdx.y << "," << blockIdx.z << "): ";
    for (int t = 0; t < threads; ++t) {
      const Fiber& f = s.fibers[static_cast<size_t>(t)];
      if (f.state == State::BlockBarrier || f.state == State::WarpBarrier) {
        os << describe(f) << " waits at " << f.where << "; ";
      }
    }
    fail(os.str());
  }
}

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

inline uint64_t seed_from_environment() {
  const char* text = std::getenv("PYIMPUTMAE_CUDA_EMU_SEED");
  return 0x9E3779B97F4A7C15ULL ^ (text != nullptr ? std::strtoull(text, nullptr, 10) : 0);
}

// kernel<<<grid, block, shared_bytes, stream>>>(args...) becomes launch(...): the arguments are
// converted to the kernel's parameter types once, as CUDA copies them at launch.
template <typename... Params, typename... Args>
void launch(const char* name, dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t, void (*kernel)(Params...),
            Args&&... args) {
  const std::lock_guard<std::mutex> lock(launch_mutex());
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535 || shared_bytes > 48 * 1024) {
    std::ostringstream os;
    os << name << ": invalid launch configuration, grid (" << grid.x << "," << grid.y << "," << grid.z
       << ") block (" << block.x << "," << block.y << "," << block.z << ") dynamic shared " << shared_bytes;
    report(os.str());
    return;
  }
  std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  Scheduler& s = scheduler();
  s.rng = seed_from_environment() ^ (uint64_t(grid.x) << 20) ^ threads;
  s.body = [&] { std::apply(kernel, params); };
  gridDim = grid;
  blockDim = block;
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> order(blocks);
  for (uint64_t i = 0; i < blocks; ++i) order[i] = i;
  s.shuffle(order);
  for (uint64_t i : order) {
    blockIdx.x = static_cast<unsigned>(i % grid.x);
    blockIdx.y = static_cast<unsigned>(i / grid.x % grid.y);
    blockIdx.z = static_cast<unsigned>(i / (uint64_t(grid.x) * grid.y));
    run_block(static_cast<int>(threads), name);
  }
}

// C10_CUDA_KERNEL_LAUNCH_CHECK: the first error of the launches since the last check
inline void launch_check(const char* file, int line) {
  if (pending_error.message.empty()) return;
  const std::string message = std::move(pending_error.message);
  pending_error.message.clear();
  TORCH_CHECK(false, "CUDA emulator: ", message, " (checked at ", file, ":", line, ")");
}

inline void device_assert(bool ok, const char* condition, const char* where) {
  if (!ok) report(std::string("device-side assertion `") + condition + "` failed at " + where);
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>, "warp value too large");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}

template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

template <typename T>
T shfl_xor(unsigned mask, T value, int lane_mask, const char* where) {
  const int linear = me().linear;
  warp_slot(linear) = to_bits(value);
  warp_barrier(mask, where);
  const int partner = (linear & ~31) | ((linear & 31) ^ lane_mask);
  const T result = from_bits<T>(warp_slot(partner));
  warp_barrier(mask, where);  // every lane has read before a slot is written again
  return result;
}

inline unsigned ballot(unsigned mask, bool predicate, const char* where) {
  const int linear = me().linear;
  warp_slot(linear) = predicate ? 1 : 0;
  warp_barrier(mask, where);
  unsigned bits = 0;
  const int first = linear & ~31;
  for (int lane = 0; lane < 32; ++lane) {
    if ((mask >> lane) & 1u) bits |= static_cast<unsigned>(warp_slot(first + lane) != 0) << lane;
  }
  warp_barrier(mask, where);
  return bits;
}

}  // namespace emu

#define EMU_STRINGIFY_(x) #x
#define EMU_STRINGIFY(x) EMU_STRINGIFY_(x)
#define EMU_WHERE __FILE__ ":" EMU_STRINGIFY(__LINE__)

#define __syncthreads() ::emu::syncthreads(EMU_WHERE)
#define __shfl_xor_sync(mask, value, lane_mask) ::emu::shfl_xor((mask), (value), (lane_mask), EMU_WHERE)
#define __ballot_sync(mask, predicate) ::emu::ballot((mask), (predicate), EMU_WHERE)

#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond) ::emu::device_assert(static_cast<bool>(cond), #cond, EMU_WHERE)

inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32);
}
inline float rsqrt(float v) { return 1.0f / std::sqrt(v); }
inline double rsqrt(double v) { return 1.0 / std::sqrt(v); }
template <typename T>
T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
T max(T a, T b) {
  return a < b ? b : a;
}

inline int atomicMax(int* address, int value) {
  const int old = *address;  // fibers switch only at barriers, so this is atomic
  if (value > old) *address = value;
  return old;
}
