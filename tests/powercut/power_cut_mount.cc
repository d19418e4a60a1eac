#include "power_cut_mount.h"

#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <regex>
#include <sstream>

#include "base/error.h"

namespace vmsync::testing {

namespace fs = std::filesystem;

std::string PowerCutMount::unavailableReason() {
  if (::geteuid() != 0) return "mounting a FUSE file system here takes root";
  if (::access("/dev/fuse", R_OK | W_OK) != 0)
    return "no usable /dev/fuse: " + std::string(std::strerror(errno));
  return "";
}

PowerCutMount::PowerCutMount(std::string at, bool keepContents, std::chrono::milliseconds syncTime)
    : at_(std::move(at)), control_(at_ + ".control"), keepContents_(keepContents) {
  missing_ = unavailableReason();
  if (!missing_.empty()) return;
  fs::create_directories(at_);
  server_ = std::make_unique<Process>(
      std::vector<std::string>{VMSYNC_POWERCUT_FS, at_, control_, std::to_string(syncTime.count())},
      at_ + ".powercut.log");
  if (!waitFor([&] { return fs::exists(control_) || !server_->running(); },
               std::chrono::seconds(20)) ||
      !fs::exists(control_)) {
    missing_ = "the power-cut file system did not mount: " + readFile(at_ + ".powercut.log");
    server_.reset();
  }
}

PowerCutMount::~PowerCutMount() {
  if (!server_) return;
  const std::string kept = at_ + ".kept";
  std::error_code ec;
  if (keepContents_) fs::copy(at_, kept, fs::copy_options::recursive, ec);
  // A lazy unmount: a process still using the mount must not keep the file
  // system's server from ending.
  ::umount2(at_.c_str(), MNT_DETACH);
  server_->stop(std::chrono::seconds(10));
  if (!keepContents_) return;
  if (!ec) {
    fs::remove_all(at_, ec);
    if (!ec) fs::rename(kept, at_, ec);
  }
  if (ec)
    std::fprintf(stderr, "power-cut file system at %s: its contents were not kept (%s); what was copied is in %s\n",
                 at_.c_str(), ec.message().c_str(), kept.c_str());
}

std::string PowerCutMount::send(const std::string& command) {
  if (!server_) throw Error("the power-cut file system at " + at_ + " is not mounted: " + missing_);
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw Error("cannot make a socket: " + std::string(std::strerror(errno)));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, control_.c_str(), sizeof addr.sun_path - 1);
  std::string answer;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
      ::send(fd, (command + "\n").data(), command.size() + 1, MSG_NOSIGNAL) ==
          static_cast<ssize_t>(command.size() + 1)) {
    char buf[256];
    for (ssize_t n; (n = ::read(fd, buf, sizeof buf)) > 0;)
      answer.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  return answer;
}

PowerCutReport PowerCutMount::ask(const std::string& command) {
  const std::string answer = send(command);
  static const std::regex report(
      R"((\d+) names undone, (\d+) files reverted, (\d+) inodes dropped; names: ([^;\n]*); files: ([^\n]*))");
  std::smatch m;
  if (!std::regex_search(answer, m, report))
    throw Error("the power-cut file system at " + at_ + " did not answer '" + command + "' (got '" +
                answer + "'): " + readFile(at_ + ".powercut.log"));
  auto split = [](const std::string& text) {
    std::vector<std::string> paths;
    std::istringstream in(text);
    for (std::string p; in >> p;) paths.push_back(p);
    return paths;
  };
  return {std::stoull(m[1]), std::stoull(m[2]), std::stoull(m[3]), split(m[4]), split(m[5])};
}

std::vector<std::string> PowerCutMount::users() const {
  std::vector<std::string> found;
  const std::string prefix = at_ + "/";
  auto under = [&](const std::string& path) { return path == at_ || path.starts_with(prefix); };
  std::error_code ec;
  for (const auto& proc : fs::directory_iterator("/proc", ec)) {
    const std::string pid = proc.path().filename().string();
    if (pid.find_first_not_of("0123456789") != std::string::npos) continue;
    bool uses = false;
    for (const auto& fd : fs::directory_iterator(proc.path() / "fd", ec)) {
      std::error_code linkError;
      if (under(fs::read_symlink(fd.path(), linkError).string())) uses = true;
    }
    std::istringstream maps(readFile(proc.path() / "maps"));
    for (std::string line; !uses && std::getline(maps, line);) {
      const auto slash = line.find('/');
      if (slash != std::string::npos && under(line.substr(slash))) uses = true;
    }
    if (uses) {
      std::string name = readFile(proc.path() / "comm");
      if (!name.empty() && name.back() == '\n') name.pop_back();
      found.push_back(pid + " (" + name + ")");
    }
  }
  return found;
}

PowerCutReport PowerCutMount::cut() { return ask("cut"); }

void PowerCutMount::restore() {
  std::vector<std::string> still;
  if (!waitFor([&] { return (still = users()).empty(); }, std::chrono::seconds(10))) {
    std::string list;
    for (const auto& u : still) list += (list.empty() ? "" : ", ") + u;
    throw Error("cannot restore the power of " + at_ +
                ": processes that used it still run: " + list);
  }
  const std::string answer = send("restore");
  if (answer != "restored\n")
    throw Error("the power-cut file system at " + at_ + " did not restore the power (got '" +
                answer + "'): " + readFile(at_ + ".powercut.log"));
}

PowerCutReport PowerCutMount::unsynced() { return ask("unsynced"); }

}  // namespace vmsync::testing
