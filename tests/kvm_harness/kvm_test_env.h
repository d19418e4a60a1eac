// Whether a KVM test runs here, on this host's /dev/kvm, or is left to the
// run of the same suites inside Debian's kernel under QEMU TCG with nested
// KVM (ctest's harvest.kvm_in_nested_kernel, run_in_nested_kernel.sh).
//
// ctest gives the direct tests VMSYNC_KVM_NESTED=<that test's name> and makes
// them require it (a fixture), so a ctest run that runs one of them runs the
// nested test too. Both sides decide by the same test: does /dev/kvm open
// read-write. If it does, the tests here run (and the nested test skips); if
// it does not, the tests here skip naming the nested test, which runs them
// (and under VMSYNC_REQUIRE_ALL=1 fails if it cannot). Exactly one of the
// two runs them. Without VMSYNC_KVM_NESTED (the binary run by hand) a host
// without KVM skips, or fails under VMSYNC_REQUIRE_ALL=1, as before.
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>

#include "mini_vmm.h"
#include "test_env.h"

namespace vmsync::testing {

/// Non-empty (the skip message) when this host's /dev/kvm does not open and
/// the environment names the nested-kernel test that runs these suites.
inline std::string leftToNestedKernel() {
  const char* nested = std::getenv("VMSYNC_KVM_NESTED");
  if (nested == nullptr || *nested == '\0') return "";
  int kvm = ::open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (kvm >= 0) {
    ::close(kvm);
    return "";
  }
  return std::string("no usable /dev/kvm on this host (") + std::strerror(errno) +
         "); these tests run in the nested kernel as " + nested;
}

}  // namespace vmsync::testing

/// For a test that needs the minimal VMM: skips when the nested kernel runs
/// it instead (see above), else skips or fails (VMSYNC_REQUIRE_ALL=1) when
/// this host's KVM cannot run the harness.
#define VMSYNC_REQUIRE_KVM_HARNESS()                                                   \
  do {                                                                                 \
    const std::string nested_ = ::vmsync::testing::leftToNestedKernel();               \
    if (!nested_.empty()) GTEST_SKIP() << nested_;                                     \
    const std::string reason_ = ::vmsync::testing::MiniVmm::unavailableReason();       \
    if (!reason_.empty()) VMSYNC_SKIP_OR_FAIL(reason_);                                \
  } while (0)
