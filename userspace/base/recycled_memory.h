// Large buffers that keep their pages from one checkpoint to the next.
//
// A checkpoint's delta (the changed units' copies and the encoder's output)
// and a standby's decoded units take tens of MiB each time. Fresh from the
// allocator, every page of them costs a page fault and the kernel's zeroing
// of it, more CPU than the copies written into them. Freed, such a buffer
// stays mapped, pages and all, for the next one of about its size; at most
// kCacheBytes of them are kept.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>

namespace vmsync {

namespace recycled {

/// Whether buffers are recycled at all: not under AddressSanitizer, which
/// must see every buffer freed to catch a use after it.
#if defined(__SANITIZE_ADDRESS__)
inline constexpr bool kEnabled = false;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
inline constexpr bool kEnabled = false;
#else
inline constexpr bool kEnabled = true;
#endif
#else
inline constexpr bool kEnabled = true;
#endif

/// Buffers of at least this many bytes are recycled; smaller ones come from
/// the ordinary allocator.
inline constexpr std::size_t kMinBytes = std::size_t{1} << 20;
/// At most this many bytes of freed buffers are kept for reuse.
inline constexpr std::size_t kCacheBytes = std::size_t{128} << 20;

/// A buffer of at least `bytes` (>= kMinBytes), page-aligned: a freed one of
/// between `bytes` and twice that when there is one, else a new mapping.
/// Throws std::bad_alloc when the kernel has no memory for it.
void* allocate(std::size_t bytes);
/// Gives back a buffer from allocate(): kept for reuse while the cache has
/// room, else unmapped.
void deallocate(void* p) noexcept;
/// Bytes of freed buffers kept for reuse now.
std::size_t cachedBytes();

}  // namespace recycled

/// An allocator for byte buffers that are written in full right after they
/// are sized: resize() leaves new elements uninitialized, and large buffers
/// are recycled (see above).
template <typename T>
struct RecyclingAllocator : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = RecyclingAllocator<U>;
  };
  RecyclingAllocator() = default;
  template <typename U>
  RecyclingAllocator(const RecyclingAllocator<U>&) noexcept {}

  static bool recycles(std::size_t n) {
    return recycled::kEnabled && n * sizeof(T) >= recycled::kMinBytes;
  }
  T* allocate(std::size_t n) {
    if (!recycles(n)) return std::allocator<T>::allocate(n);
    return static_cast<T*>(recycled::allocate(n * sizeof(T)));
  }
  void deallocate(T* p, std::size_t n) noexcept {
    if (!recycles(n)) return std::allocator<T>::deallocate(p, n);
    recycled::deallocate(p);
  }
  template <typename U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
  template <typename U>
  bool operator==(const RecyclingAllocator<U>&) const noexcept {
    return true;
  }
};

}  // namespace vmsync
