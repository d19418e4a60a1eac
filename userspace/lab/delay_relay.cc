#include "lab/delay_relay.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sched.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <deque>
#include <list>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "base/error.h"
#include "transport/rpc_util.h"

namespace vmsync {

namespace {

using Clock = std::chrono::steady_clock;

/// Most bytes one direction holds back at a time; reading pauses above it.
constexpr std::size_t kMaxHeldBytes = 8u << 20;

sockaddr_in socketAddress(const std::string& host, std::uint16_t port) {
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  if (::inet_pton(AF_INET, host.c_str(), &addr.sin_addr) != 1) fail("'{}' is not an IPv4 address", host);
  return addr;
}


/// A chunk of bytes and when it may leave.
struct Held {
  Clock::time_point due;
  std::vector<char> bytes;
  std::size_t sent = 0;
};

/// One relayed connection: the accepted socket and the one to the target.
struct Connection {
  int outer = -1;  // accepted (the device's side)
  int inner = -1;  // to the target
  std::atomic<bool> broken{false};

  ~Connection() {
    if (outer >= 0) ::close(outer);
    if (inner >= 0) ::close(inner);
  }
  /// Ends both directions: the other pump sees the end and stops too.
  void breakBoth() {
    broken = true;
    ::shutdown(outer, SHUT_RDWR);
    ::shutdown(inner, SHUT_RDWR);
  }
};

/// Moves bytes from `from` to `to`, each held for the delay `delayMs` held
/// when it was read plus a draw from `random` in [0, `jitterMs`].
/// Returns when `from` ends and everything is delivered, on an error, or when
/// `stop` becomes readable.
void pump(const std::shared_ptr<Connection>& connection, int from, int to,
          const std::atomic<std::int64_t>& delayMs, const std::atomic<std::int64_t>& jitterMs,
          std::mt19937_64 random, int stop) {
  std::deque<Held> held;
  std::size_t heldBytes = 0;
  bool ended = false;
  std::vector<char> buffer(256 * 1024);
  while (!connection->broken) {
    const auto now = Clock::now();
    const bool frontDue = !held.empty() && held.front().due <= now;
    if (ended && held.empty()) {
      ::shutdown(to, SHUT_WR);
      return;
    }
    int timeout = -1;
    if (!held.empty() && !frontDue)
      timeout = static_cast<int>(
          std::chrono::ceil<std::chrono::milliseconds>(held.front().due - now).count());
    pollfd fds[3] = {{stop, POLLIN, 0},
                     {from, static_cast<short>(!ended && heldBytes < kMaxHeldBytes ? POLLIN : 0), 0},
                     {to, static_cast<short>(frontDue ? POLLOUT : 0), 0}};
    if (::poll(fds, 3, timeout) < 0) {
      if (errno == EINTR) continue;
      connection->breakBoth();
      return;
    }
    if (fds[0].revents) return;
    if (fds[1].revents & (POLLIN | POLLHUP | POLLERR)) {
      ssize_t n = ::read(from, buffer.data(), buffer.size());
      if (n > 0) {
        // A new delay holds new bytes; those held already keep their time (and
        // their order: a chunk due before the one ahead of it waits for it).
        std::chrono::milliseconds delay(delayMs.load(std::memory_order_relaxed));
        if (const std::int64_t jitter = jitterMs.load(std::memory_order_relaxed); jitter > 0)
          delay += std::chrono::milliseconds(std::uniform_int_distribution<std::int64_t>(0, jitter)(random));
        held.push_back(Held{Clock::now() + delay, std::vector<char>(buffer.begin(), buffer.begin() + n)});
        heldBytes += static_cast<std::size_t>(n);
      } else if (n == 0) {
        ended = true;
      } else if (errno != EAGAIN && errno != EINTR) {
        // A dead link (ETIMEDOUT) or a reset: the other side must see it too.
        connection->breakBoth();
        return;
      }
    }
    if (fds[2].revents & (POLLERR | POLLHUP)) {
      connection->breakBoth();
      return;
    }
    if (fds[2].revents & POLLOUT) {
      while (!held.empty() && held.front().due <= Clock::now()) {
        Held& front = held.front();
        ssize_t n = ::send(to, front.bytes.data() + front.sent, front.bytes.size() - front.sent,
                           MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n < 0) {
          if (errno == EAGAIN || errno == EINTR) break;
          connection->breakBoth();
          return;
        }
        front.sent += static_cast<std::size_t>(n);
        if (front.sent < front.bytes.size()) break;
        heldBytes -= front.bytes.size();
        held.pop_front();
      }
    }
  }
}

}  // namespace

void enterNetworkNamespace(const std::string& name) {
  if (name.empty()) return;
  const std::string path = "/run/netns/" + name;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throwLastErrno(fmt::format("cannot open network namespace {}", name));
  int rc = ::setns(fd, CLONE_NEWNET);
  int err = errno;
  ::close(fd);
  if (rc != 0) throwErrno(err, fmt::format("cannot enter network namespace {}", name));
}

bool detectDeadLink(int fd) {
  return detectDeadLink([fd](int level, int name, const void* value, unsigned length) {
    return ::setsockopt(fd, level, name, value, length) == 0;
  });
}

struct DelayRelay::State {
  DelayRelayOptions options;
  int listener = -1;
  int stop = -1;  // eventfd: readable once the relay shuts down
  std::atomic<std::uint64_t> accepted{0};
  std::atomic<std::int64_t> delayMs{0};  // options.oneWayDelay, or what setOneWayDelay set since
  std::atomic<std::int64_t> jitterMs{0};  // options.jitter, or what setJitter set since
  std::mutex mutex;
  std::list<std::thread> pumps;
  std::list<std::shared_ptr<Connection>> open;
  std::thread acceptor;

  void acceptLoop() {
    while (true) {
      pollfd fds[2] = {{stop, POLLIN, 0}, {listener, POLLIN, 0}};
      if (::poll(fds, 2, -1) < 0) {
        if (errno == EINTR) continue;
        spdlog::error("delay relay on {}:{}: poll: {}", options.listenHost, options.listenPort, std::strerror(errno));
        return;
      }
      if (fds[0].revents) return;
      int outer = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
      if (outer < 0) continue;
      auto connection = std::make_shared<Connection>();
      connection->outer = outer;
      detectDeadLink(outer);
      int one = 1;
      ::setsockopt(outer, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      connection->inner = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      sockaddr_in target = socketAddress(options.targetHost, options.targetPort);
      if (connection->inner < 0 ||
          ::connect(connection->inner, reinterpret_cast<sockaddr*>(&target), sizeof target) != 0) {
        spdlog::warn("delay relay: cannot reach {}:{}: {}", options.targetHost, options.targetPort,
                     std::strerror(errno));
        continue;  // the connection closes the accepted socket
      }
      ::setsockopt(connection->inner, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      const std::uint64_t number = accepted++;
      std::mt19937_64 upstream(options.seed ^ (number * 2 + 0x9e3779b97f4a7c15ull));
      std::mt19937_64 downstream(options.seed ^ (number * 2 + 1 + 0x9e3779b97f4a7c15ull));
      std::lock_guard lock(mutex);
      open.push_back(connection);
      pumps.emplace_back([connection, this, upstream] {
        pump(connection, connection->outer, connection->inner, delayMs, jitterMs, upstream, stop);
      });
      pumps.emplace_back([connection, this, downstream] {
        pump(connection, connection->inner, connection->outer, delayMs, jitterMs, downstream, stop);
      });
    }
  }
};

DelayRelay::DelayRelay(DelayRelayOptions options) : state_(std::make_unique<State>()) {
  State& s = *state_;
  s.options = std::move(options);
  s.delayMs = s.options.oneWayDelay.count();
  if (s.options.jitter.count() < 0) fail("delay relay jitter {} ms is negative", s.options.jitter.count());
  s.jitterMs = s.options.jitter.count();
  s.stop = ::eventfd(0, EFD_CLOEXEC);
  if (s.stop < 0) throwLastErrno("eventfd");
  // The listening socket is made in the namespace by a thread that entered
  // it; sockets keep their namespace, so the rest may run anywhere.
  std::string error;
  std::thread maker([&] {
    try {
      enterNetworkNamespace(s.options.networkNamespace);
      s.listener = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      if (s.listener < 0) throwLastErrno("socket");
      int one = 1;
      ::setsockopt(s.listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
      sockaddr_in addr = socketAddress(s.options.listenHost, s.options.listenPort);
      if (::bind(s.listener, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || ::listen(s.listener, 16) != 0)
        throwLastErrno(fmt::format("delay relay cannot listen on {}:{}", s.options.listenHost, s.options.listenPort));
    } catch (const Error& e) {
      error = e.what();
    }
  });
  maker.join();
  if (!error.empty()) {
    if (s.listener >= 0) ::close(s.listener);
    ::close(s.stop);
    throw Error(error);
  }
  // Connections to the target are made from the acceptor: it enters the namespace too.
  s.acceptor = std::thread([&s] {
    try {
      enterNetworkNamespace(s.options.networkNamespace);
    } catch (const Error& e) {
      spdlog::error("delay relay: {}", e.what());
      return;
    }
    s.acceptLoop();
  });
}

DelayRelay::~DelayRelay() {
  State& s = *state_;
  std::uint64_t one = 1;
  [[maybe_unused]] ssize_t n = ::write(s.stop, &one, sizeof one);
  s.acceptor.join();
  {
    std::lock_guard lock(s.mutex);
    for (auto& connection : s.open) connection->breakBoth();
  }
  for (auto& t : s.pumps) t.join();
  s.open.clear();
  ::close(s.listener);
  ::close(s.stop);
}

std::uint64_t DelayRelay::connections() const { return state_->accepted; }

void DelayRelay::setOneWayDelay(std::chrono::milliseconds delay) { state_->delayMs = delay.count(); }

void DelayRelay::setJitter(std::chrono::milliseconds jitter) {
  if (jitter.count() < 0) fail("delay relay jitter {} ms is negative", jitter.count());
  state_->jitterMs = jitter.count();
}

}  // namespace vmsync
