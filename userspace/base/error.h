// One error type for the controller and the server: a message a user can act on.
#pragma once

#include <fmt/format.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>

namespace vmsync {

/// An error that reaches the user as one line, e.g.
/// "cannot map RAM file ram.img: Permission denied".
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Throws Error("<what>: <strerror(err)>"); `err` is a positive errno value.
[[noreturn]] inline void throwErrno(int err, const std::string& what) {
  throw Error(fmt::format("{}: {}", what, std::strerror(err)));
}

/// Throws Error for the current errno.
[[noreturn]] inline void throwLastErrno(const std::string& what) { throwErrno(errno, what); }

/// Throws Error with a formatted message.
template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> format, Args&&... args) {
  throw Error(fmt::format(format, std::forward<Args>(args)...));
}

}  // namespace vmsync
