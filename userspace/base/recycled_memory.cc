#include "base/recycled_memory.h"

#include <sys/mman.h>

#include <algorithm>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace vmsync::recycled {

namespace {

constexpr std::size_t kPage = 4096;

struct Cache {
  std::mutex mutex;
  std::unordered_map<void*, std::size_t> live;      // handed out: their mapped sizes
  std::vector<std::pair<void*, std::size_t>> free;  // kept for reuse, oldest first
  std::size_t freeBytes = 0;
};

Cache& cache() {
  static Cache* instance = new Cache;  // never destroyed: buffers may be freed at exit
  return *instance;
}

}  // namespace

void* allocate(std::size_t bytes) {
  const std::size_t size = (bytes + kPage - 1) / kPage * kPage;
  Cache& c = cache();
  {
    std::lock_guard lock(c.mutex);
    // The smallest kept buffer that fits without wasting more than it holds.
    auto best = c.free.end();
    for (auto it = c.free.begin(); it != c.free.end(); ++it)
      if (it->second >= size && it->second <= 2 * size &&
          (best == c.free.end() || it->second < best->second))
        best = it;
    if (best != c.free.end()) {
      auto [p, mapped] = *best;
      c.free.erase(best);
      c.freeBytes -= mapped;
      c.live.emplace(p, mapped);
      return p;
    }
  }
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  std::lock_guard lock(c.mutex);
  c.live.emplace(p, size);
  return p;
}

void deallocate(void* p) noexcept {
  Cache& c = cache();
  std::size_t size;
  std::vector<std::pair<void*, std::size_t>> unmap;  // done once the lock is let go
  {
    std::lock_guard lock(c.mutex);
    auto it = c.live.find(p);
    if (it == c.live.end()) return;  // not ours: nothing sane to do
    size = it->second;
    c.live.erase(it);
    if (size > kCacheBytes) {
      unmap.emplace_back(p, size);
    } else {
      // Kept with its pages (MADV_FREE, which would let the kernel take them
      // back, cost a third more CPU per checkpoint here); room made for it by
      // unmapping the oldest ones.
      while (c.freeBytes + size > kCacheBytes && !c.free.empty()) {
        unmap.push_back(c.free.front());
        c.freeBytes -= c.free.front().second;
        c.free.erase(c.free.begin());
      }
      c.free.emplace_back(p, size);
      c.freeBytes += size;
    }
  }
  for (auto [q, n] : unmap) ::munmap(q, n);
}

std::size_t cachedBytes() {
  Cache& c = cache();
  std::lock_guard lock(c.mutex);
  return c.freeBytes;
}

}  // namespace vmsync::recycled
