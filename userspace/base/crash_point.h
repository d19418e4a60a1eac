// Test hook for crash tests: stop the process at a named point, as kill -9 would.
#pragma once

namespace vmsync {

/// When the environment variable VMSYNC_CRASH_AT equals `point`, the process
/// sends itself SIGKILL here. Points: before-data-write, after-data-fsync,
/// after-rename, after-commit, before-ack (server, one push);
/// standby-after-write (device: image written, applied sequence not yet saved).
/// A test hook only: unset in normal use, it costs one getenv.
void crashPoint(const char* point);

}  // namespace vmsync
