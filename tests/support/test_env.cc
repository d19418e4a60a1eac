#include "test_env.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

namespace vmsync::testing {

namespace fs = std::filesystem;

bool requireAll() {
  const char* v = std::getenv("VMSYNC_REQUIRE_ALL");
  return v != nullptr && std::string(v) == "1";
}

TempDir::TempDir() {
  char tmpl[] = "/tmp/vmsync-it-XXXXXX";
  const char* p = ::mkdtemp(tmpl);
  if (p == nullptr) throw std::runtime_error("mkdtemp failed");
  path_ = p;
}

TempDir::~TempDir() {
  if (std::getenv("VMSYNC_KEEP_TEST_DIRS") == nullptr) fs::remove_all(path_);
}

LoopMount::LoopMount(std::string type, std::string at) : at_(std::move(at)) {
  if (::geteuid() != 0) {
    missing_ = "mounting " + type + " takes root";
    return;
  }
  std::ifstream known("/proc/filesystems");
  bool there = false;
  for (std::string line; std::getline(known, line);) there = there || line.ends_with("\t" + type);
  if (!there) {
    missing_ = "this kernel has no " + type;
    return;
  }
  // 512 MiB: room for XFS's smallest; sparse, so it takes what is written only.
  const std::string image = backing_ / "fs.img";
  std::ofstream(image).close();
  fs::resize_file(image, 512u << 20);
  std::string out;
  if (run({"mkfs." + type, "-q", "-f", image}, &out) != 0) {
    missing_ = "mkfs." + type + " failed (are its tools installed?): " + out;
    return;
  }
  fs::create_directories(at_);
  // A loop device that goes with the mount (autoclear).
  if (run({"mount", "-t", type, "-o", "loop", image, at_}, &out) != 0)
    missing_ = "cannot mount " + type + ": " + out;
}

LoopMount::~LoopMount() {
  std::string out;
  if (missing_.empty() && run({"umount", at_}, &out) != 0) run({"umount", "-l", at_}, &out);
}

Process::Process(std::vector<std::string> argv, std::string logPath) : logPath_(std::move(logPath)) {
  std::vector<char*> args;
  for (auto& a : argv) args.push_back(a.data());
  args.push_back(nullptr);
  pid_ = ::fork();
  if (pid_ < 0) throw std::runtime_error("fork failed");
  if (pid_ == 0) {
    // A test that crashes takes its servers and daemons with it (and a
    // daemon its QEMU): none is left running to load the tests after it.
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    int fd = ::open(logPath_.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) {
      ::dup2(fd, 1);
      ::dup2(fd, 2);
    }
    ::execv(args[0], args.data());
    std::fprintf(stderr, "exec %s: %s\n", args[0], std::strerror(errno));
    ::_exit(127);
  }
}

Process::~Process() {
  if (pid_ > 0) stop(std::chrono::seconds(20));
}

bool Process::running() {
  if (pid_ <= 0) return false;
  int status = 0;
  pid_t r = ::waitpid(pid_, &status, WNOHANG);
  if (r == pid_) {
    status_ = status;
    pid_ = -1;
    return false;
  }
  return true;
}

int Process::stop(std::chrono::milliseconds grace) {
  if (!running()) return status_;
  ::kill(pid_, SIGTERM);
  auto deadline = std::chrono::steady_clock::now() + grace;
  while (running()) {
    if (std::chrono::steady_clock::now() > deadline) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, &status_, 0);
      pid_ = -1;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return status_;
}

void Process::kill() {
  if (!running()) return;
  ::kill(pid_, SIGKILL);
  ::waitpid(pid_, &status_, 0);
  pid_ = -1;
}

int run(const std::vector<std::string>& argv, std::string* output, std::string* errors) {
  std::string cmd;
  for (const auto& a : argv) {
    cmd += "'";
    for (char c : a) cmd += (c == '\'') ? std::string("'\\''") : std::string(1, c);
    cmd += "' ";
  }
  std::string errorFile;
  if (errors) {
    char tmpl[] = "/tmp/vmsync-stderr-XXXXXX";
    int fd = ::mkstemp(tmpl);
    if (fd < 0) return -1;
    ::close(fd);
    errorFile = tmpl;
    cmd += "2>'" + errorFile + "'";
  } else {
    cmd += "2>&1";
  }
  FILE* pipe = ::popen(cmd.c_str(), "r");
  if (pipe == nullptr) return -1;
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, pipe)) > 0) out.append(buf, n);
  int status = ::pclose(pipe);
  if (output) *output = out;
  if (errors) {
    *errors = readFile(errorFile);
    ::unlink(errorFile.c_str());
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

bool waitFor(const std::function<bool()>& condition, std::chrono::milliseconds timeout,
             std::chrono::milliseconds poll) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (condition()) return true;
    std::this_thread::sleep_for(poll);
  }
  return condition();
}

std::string readFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

int freePort() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  socklen_t len = sizeof addr;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(fd);
  return ntohs(addr.sin_port);
}

std::string vmsyncBinary() { return VMSYNC_BINARY; }

std::string guestImage() {
  const char* v = std::getenv("VMSYNC_IMAGE");
  return v ? v : VMSYNC_IMAGES_DIR "/counter";
}

std::string videoImage() {
  const char* v = std::getenv("VMSYNC_VIDEO_IMAGE");
  return v ? v : VMSYNC_IMAGES_DIR "/video";
}

std::string missingForVm(const std::string& image) {
  std::string out;
  if (run({"qemu-system-x86_64", "--version"}, &out) != 0) return "qemu-system-x86_64 is not installed";
  for (const char* f : {"vmlinuz", "initrd.img", "disk.img", "cmdline"})
    if (!fs::exists(image + "/" + f))
      return "guest image " + image + " has no " + f + " (run vm-images/build.sh or make test)";
  return "";
}

}  // namespace vmsync::testing
