#include "lab/gnuplot.h"

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "base/durable_file.h"

extern char** environ;

namespace vmsync {

std::string gnuplotPreamble(int width, int height) {
  return fmt::format("set terminal pngcairo size {},{} noenhanced\nset grid\n", width, height);
}

std::string gnuplotQuote(const std::string& text) {
  std::string quoted = "\"";
  for (char c : text) {
    if (c == '\n') quoted += "\\n";
    else if (c == '"' || c == '\\') quoted += std::string("\\") + c;
    else quoted += c;
  }
  return quoted + "\"";
}

std::string runGnuplot(const std::string& scriptPath, const std::string& script) {
  writeFileDurably(scriptPath, script.data(), script.size());
  const std::string logPath = std::filesystem::path(scriptPath).replace_extension(".gnuplot.log").string();
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 1, logPath.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&actions, 1, 2);
  const char* argv[] = {"gnuplot", scriptPath.c_str(), nullptr};
  pid_t pid = -1;
  const int err = ::posix_spawnp(&pid, "gnuplot", &actions, nullptr, const_cast<char* const*>(argv), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (err == ENOENT) return "gnuplot is not installed (none on PATH)";
  if (err != 0) return fmt::format("cannot run gnuplot: {}", std::strerror(err));
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0)
    if (errno != EINTR) return fmt::format("cannot wait for gnuplot: {}", std::strerror(errno));
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return "";
  return fmt::format("gnuplot failed ({}); its messages are in {}",
                     WIFEXITED(status) ? fmt::format("exit status {}", WEXITSTATUS(status))
                                       : fmt::format("signal {}", WTERMSIG(status)),
                     logPath);
}

void drawPlots(const std::string& command, const std::string& scriptPath, const std::string& script,
               const std::vector<std::string>& pngs) {
  if (auto why = runGnuplot(scriptPath, script); !why.empty()) {
    spdlog::warn("{}: no plots: {}; the rest of the output is complete, and {} draws them where gnuplot runs",
                 command, why, scriptPath);
    return;
  }
  for (const auto& png : pngs) std::printf("plot: %s\n", png.c_str());
  std::fflush(stdout);
}

}  // namespace vmsync
