// Sources of "which units may have changed": one interface, several backends.
//
// A PageSource reports guest RAM pages, a BlockSource guest disk blocks; both
// speak in 4096-byte unit indexes. The contract follows the pre-copy rules of
// DESIGN.md: harvest() reads the dirty set and resets it in one step, before
// any byte is copied, so a write after the reset shows up in the next harvest.
// A source may over-report (a page rewritten with the same bytes); it must never
// under-report. When it cannot vouch for its set (a ring overflowed, records
// were lost) it says so with `everything`, and the caller rescans.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace vmsync {

/// What a source reports for one harvest.
struct DirtyUnits {
  /// Every unit is a candidate (scan sources, or a fallback after lost records).
  bool everything = false;
  /// Otherwise the candidate unit indexes, in any order, duplicates allowed.
  std::vector<std::uint64_t> units;
  /// Why `everything` was set by a source that normally tracks writes (for logs).
  std::string rescanReason;
};

/// Reports guest RAM pages that may have changed since the previous harvest.
class PageSource {
 public:
  virtual ~PageSource() = default;
  /// Short name shown to the user ("scan", "kmod", "kvm-ring").
  virtual std::string name() const = 0;
  /// Returns the candidates and resets tracking. Throws vmsync::Error on failure.
  virtual DirtyUnits harvest() = 0;
  /// True when the source sees every write to guest RAM, the VMM's own
  /// included (not only the vCPUs'), so that a final checkpoint may trust
  /// its list instead of comparing every unit.
  virtual bool reportsEveryWrite() const { return false; }
  /// What the source counted since it started, for the log of a final
  /// checkpoint; empty when it has nothing to say.
  virtual std::string counters() const { return ""; }
};

/// Reports guest disk blocks that may have changed since the previous harvest.
class BlockSource {
 public:
  virtual ~BlockSource() = default;
  /// Short name shown to the user ("scan", "bpf").
  virtual std::string name() const = 0;
  /// Returns the candidates and resets tracking. Throws vmsync::Error on failure.
  virtual DirtyUnits harvest() = 0;
};

/// The scan page source: every page is a candidate; the checkpoint builder
/// compares hashes. Works with any VMM and accelerator.
class ScanPageSource final : public PageSource {
 public:
  std::string name() const override { return "scan"; }
  DirtyUnits harvest() override { return DirtyUnits{.everything = true}; }
  bool reportsEveryWrite() const override { return true; }
};

/// The scan block source: every block is a candidate.
class ScanBlockSource final : public BlockSource {
 public:
  std::string name() const override { return "scan"; }
  DirtyUnits harvest() override { return DirtyUnits{.everything = true}; }
};

}  // namespace vmsync
