#include "vmm/loop_device.h"

#include <fcntl.h>
#include <linux/loop.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "base/error.h"

namespace vmsync {

LoopDevice::LoopDevice(const std::string& backingFile) {
  int backing = ::open(backingFile.c_str(), O_RDWR | O_CLOEXEC);
  if (backing < 0) throwLastErrno(fmt::format("cannot open {}", backingFile));
  int control = ::open("/dev/loop-control", O_RDWR | O_CLOEXEC);
  if (control < 0) {
    int saved = errno;
    ::close(backing);
    throwErrno(saved, "cannot open /dev/loop-control");
  }
  int lastErrno = 0;
  for (int attempt = 0; attempt < 10 && fd_ < 0; ++attempt) {
    int number = ::ioctl(control, LOOP_CTL_GET_FREE);
    if (number < 0) {
      lastErrno = errno;
      break;
    }
    std::string path = fmt::format("/dev/loop{}", number);
    int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) {
      lastErrno = errno;
      continue;
    }
    loop_config config{};
    config.fd = static_cast<__u32>(backing);
    config.info.lo_flags = LO_FLAGS_AUTOCLEAR;
    if (::ioctl(fd, LOOP_CONFIGURE, &config) == 0) {
      fd_ = fd;
      path_ = path;
    } else {
      lastErrno = errno;  // EBUSY: another process took it first
      ::close(fd);
    }
  }
  ::close(control);
  ::close(backing);
  if (fd_ < 0)
    throwErrno(lastErrno, fmt::format("cannot set up a loop device over {}", backingFile));
}

LoopDevice::~LoopDevice() {
  if (fd_ >= 0) {
    ::ioctl(fd_, LOOP_CLR_FD);
    ::close(fd_);
  }
}

}  // namespace vmsync
