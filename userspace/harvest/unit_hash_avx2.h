// xxh3-64 built for AVX2: only for CPUs where __builtin_cpu_supports("avx2").
#pragma once

#include <cstddef>
#include <cstdint>

namespace vmsync {

/// XXH3_64bits(data, size), compiled for AVX2. Defined only when
/// VMSYNC_HAVE_AVX2_HASH is (x86-64 builds).
std::uint64_t hashBytesAvx2(const void* data, std::size_t size);

}  // namespace vmsync
