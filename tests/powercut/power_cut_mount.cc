#include "power_cut_mount.h"

#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <regex>
#include <sstream>

#include "base/error.h"

namespace vmsync::testing {

namespace fs = std::filesystem;

PowerCutMount::PowerCutMount(std::string at) : at_(std::move(at)), control_(at_ + ".control") {
  if (::geteuid() != 0) {
    missing_ = "mounting a FUSE file system here takes root";
    return;
  }
  if (::access("/dev/fuse", R_OK | W_OK) != 0) {
    missing_ = "no usable /dev/fuse: " + std::string(std::strerror(errno));
    return;
  }
  fs::create_directories(at_);
  server_ = std::make_unique<Process>(std::vector<std::string>{VMSYNC_POWERCUT_FS, at_, control_}, at_ + ".log");
  if (!waitFor([&] { return fs::exists(control_) || !server_->running(); }, std::chrono::seconds(20)) ||
      !fs::exists(control_)) {
    missing_ = "the power-cut file system did not mount: " + readFile(at_ + ".log");
    server_.reset();
  }
}

PowerCutMount::~PowerCutMount() {
  if (!server_) return;
  // A lazy unmount first: a process still using the mount must not keep the
  // server from ending.
  ::umount2(at_.c_str(), MNT_DETACH);
  server_->stop(std::chrono::seconds(10));
}

PowerCutReport PowerCutMount::ask(const std::string& command) {
  if (!server_) throw Error("the power-cut file system at " + at_ + " is not mounted: " + missing_);
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw Error("cannot make a socket: " + std::string(std::strerror(errno)));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, control_.c_str(), sizeof addr.sun_path - 1);
  std::string answer;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
      ::write(fd, (command + "\n").data(), command.size() + 1) == static_cast<ssize_t>(command.size() + 1)) {
    char buf[256];
    for (ssize_t n; (n = ::read(fd, buf, sizeof buf)) > 0;) answer.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  static const std::regex report(
      R"((\d+) names undone, (\d+) files reverted, (\d+) inodes dropped; names: ([^;\n]*); files: ([^\n]*))");
  std::smatch m;
  if (!std::regex_search(answer, m, report))
    throw Error("the power-cut file system at " + at_ + " did not answer '" + command + "' (got '" + answer +
                "'): " + readFile(at_ + ".log"));
  auto split = [](const std::string& text) {
    std::vector<std::string> paths;
    std::istringstream in(text);
    for (std::string p; in >> p;) paths.push_back(p);
    return paths;
  };
  return {std::stoull(m[1]), std::stoull(m[2]), std::stoull(m[3]), split(m[4]), split(m[5])};
}

PowerCutReport PowerCutMount::cut() { return ask("cut"); }
PowerCutReport PowerCutMount::unsynced() { return ask("unsynced"); }

}  // namespace vmsync::testing
