#include "base/background.h"

#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace vmsync {

bool runInBackground() {
  const pid_t thread = static_cast<pid_t>(::syscall(SYS_gettid));
  // On Linux this applies to the one thread named by its id.
  return ::setpriority(PRIO_PROCESS, static_cast<id_t>(thread), 10) == 0;
}

}  // namespace vmsync
