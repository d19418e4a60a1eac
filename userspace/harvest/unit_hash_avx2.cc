// xxh3-64 compiled for AVX2 (this file alone is built with -mavx2); unit_hashes.cc
// calls it only on CPUs that have AVX2. xxh3 is one function of the bytes, so
// the hash is the library's, bit for bit, only faster on a 4096-byte unit.
// Nothing else may live here: any code in this file may use AVX2 instructions.
#define XXH_INLINE_ALL
#include <xxhash.h>

#include "harvest/unit_hash_avx2.h"

namespace vmsync {

std::uint64_t hashBytesAvx2(const void* data, std::size_t size) { return XXH3_64bits(data, size); }

}  // namespace vmsync
