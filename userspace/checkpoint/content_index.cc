#include "checkpoint/content_index.h"

#include "base/error.h"

namespace vmsync {

namespace {

constexpr std::size_t kFirstSlots = 1024;
constexpr std::uint64_t kMaxUnits = 0xfffffffeu;  // unit + 1 fits in a slot

}  // namespace

void ContentIndex::rebuild(std::span<const std::uint64_t> hashes) {
  if (hashes.size() > kMaxUnits)
    fail("an image of {} units is too large for the content index ({} at most)", hashes.size(), kMaxUnits);
  slots_.assign(kFirstSlots, 0);
  count_ = 0;
  for (std::uint64_t unit = 0; unit < hashes.size(); ++unit) insert(unit, hashes);
}

std::optional<std::uint64_t> ContentIndex::find(std::uint64_t hash, std::span<const std::uint64_t> hashes) const {
  if (slots_.empty() || hash == zeroHash_) return std::nullopt;
  for (std::size_t at = home(hash);; at = (at + 1) & (slots_.size() - 1)) {
    const std::uint32_t slot = slots_[at];
    if (slot == 0) return std::nullopt;
    if (hashes[slot - 1] == hash) return slot - 1;
  }
}

void ContentIndex::erase(std::uint64_t unit, std::span<const std::uint64_t> hashes) {
  if (slots_.empty() || hashes[unit] == zeroHash_) return;
  const std::size_t mask = slots_.size() - 1;
  std::size_t hole = home(hashes[unit]);
  for (;; hole = (hole + 1) & mask) {
    if (slots_[hole] == 0) return;  // not the holder
    if (slots_[hole] - 1 == unit) break;
  }
  // Backward shift: each later entry of the run whose home does not lie
  // between the hole and itself moves into the hole, so that no search stops
  // early at it.
  for (std::size_t next = (hole + 1) & mask; slots_[next] != 0; next = (next + 1) & mask) {
    const std::size_t want = home(hashes[slots_[next] - 1]);
    const bool staysPut = hole <= next ? (hole < want && want <= next) : (hole < want || want <= next);
    if (staysPut) continue;
    slots_[hole] = slots_[next];
    hole = next;
  }
  slots_[hole] = 0;
  --count_;
}

void ContentIndex::insert(std::uint64_t unit, std::span<const std::uint64_t> hashes) {
  const std::uint64_t hash = hashes[unit];
  if (hash == zeroHash_ || find(hash, hashes)) return;
  if (unit >= kMaxUnits) fail("unit {} is beyond what the content index holds ({} units)", unit, kMaxUnits);
  if ((count_ + 1) * 2 > slots_.size()) grow(hashes);
  place(unit, hash);
}

void ContentIndex::grow(std::span<const std::uint64_t> hashes) {
  std::vector<std::uint32_t> old = std::move(slots_);
  slots_.assign(old.empty() ? kFirstSlots : old.size() * 2, 0);
  count_ = 0;
  for (const std::uint32_t slot : old)
    if (slot != 0) place(slot - 1, hashes[slot - 1]);
}

void ContentIndex::place(std::uint64_t unit, std::uint64_t hash) {
  std::size_t at = home(hash);
  while (slots_[at] != 0) at = (at + 1) & (slots_.size() - 1);
  slots_[at] = static_cast<std::uint32_t>(unit + 1);
  ++count_;
}

}  // namespace vmsync
