// Work that may wait: the calling thread gives way to the others of its
// process for the CPU.
#pragma once

namespace vmsync {

/// Lowers the calling thread's CPU priority (nice 10), so that a fold or a
/// like bulk job takes what the pushes and forwards leave. Returns false
/// where the kernel refuses; the work then runs at the usual priority.
bool runInBackground();

}  // namespace vmsync
