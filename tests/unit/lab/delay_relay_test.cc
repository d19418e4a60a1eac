// The delay relay carries every byte, in order, both ways, and passes an end
// of stream on; a connection it cannot deliver is closed, not left hanging.
#include "lab/delay_relay.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <string>
#include <thread>

namespace vmsync {
namespace {

/// A listening socket on 127.0.0.1 with a kernel-chosen port.
struct Listener {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  std::uint16_t port = 0;
  Listener() {
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
    ::listen(fd, 4);
    socklen_t length = sizeof addr;
    ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &length);
    port = ntohs(addr.sin_port);
  }
  ~Listener() { ::close(fd); }
};

int connectTo(std::uint16_t port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

std::string readAll(int fd) {
  std::string out;
  char buffer[65536];
  ssize_t n;
  while ((n = ::read(fd, buffer, sizeof buffer)) > 0) out.append(buffer, static_cast<std::size_t>(n));
  return out;
}

void writeAll(int fd, const std::string& data) {
  std::size_t done = 0;
  while (done < data.size()) {
    ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    ASSERT_GT(n, 0);
    done += static_cast<std::size_t>(n);
  }
}

std::uint16_t unusedPort() {
  Listener probe;
  return probe.port;
}

/// A relay on 127.0.0.1 to `targetPort`, holding bytes `delay` each way.
DelayRelayOptions relayTo(std::uint16_t targetPort, std::chrono::milliseconds delay) {
  DelayRelayOptions options;
  options.listenHost = "127.0.0.1";
  options.listenPort = unusedPort();
  options.targetPort = targetPort;
  options.oneWayDelay = delay;
  return options;
}

TEST(DelayRelay, CarriesEveryByteInOrderBothWays) {
  Listener target;
  const DelayRelayOptions options = relayTo(target.port, std::chrono::milliseconds(20));
  DelayRelay relay(options);

  std::string upstream(3 << 20, '\0');
  for (std::size_t i = 0; i < upstream.size(); ++i) upstream[i] = static_cast<char>(i * 7 + i / 4096);
  const std::string downstream = "answer after the end of the request";
  std::string received;
  std::thread server([&] {
    int fd = ::accept(target.fd, nullptr, nullptr);
    received = readAll(fd);  // until the client's end of stream comes through
    writeAll(fd, downstream);
    ::close(fd);
  });
  int client = connectTo(options.listenPort);
  ASSERT_GE(client, 0);
  writeAll(client, upstream);
  ::shutdown(client, SHUT_WR);
  const std::string answer = readAll(client);
  ::close(client);
  server.join();
  EXPECT_TRUE(received == upstream) << "relayed " << received.size() << " of " << upstream.size() << " bytes";
  EXPECT_EQ(answer, downstream);
  EXPECT_EQ(relay.connections(), 1u);
}

TEST(DelayRelay, AConnectionToAnAbsentTargetIsClosed) {
  const DelayRelayOptions options = relayTo(unusedPort(), std::chrono::milliseconds(0));  // nothing listens there
  DelayRelay relay(options);
  int client = connectTo(options.listenPort);
  ASSERT_GE(client, 0);
  EXPECT_EQ(readAll(client), "");  // end of stream, not a hang
  ::close(client);
  EXPECT_EQ(relay.connections(), 0u);
}

/// A link that changes (wifi to lte): a new delay holds the bytes an open
/// connection sends from then on, and the bytes held already stay ahead of them.
TEST(DelayRelay, ANewDelayHoldsLaterBytesOfAnOpenConnectionInOrder) {
  Listener target;
  const DelayRelayOptions options = relayTo(target.port, std::chrono::milliseconds(0));
  DelayRelay relay(options);
  std::string received;
  std::thread server([&] {
    int fd = ::accept(target.fd, nullptr, nullptr);
    received = readAll(fd);
    ::close(fd);
  });
  int client = connectTo(options.listenPort);
  ASSERT_GE(client, 0);
  using Clock = std::chrono::steady_clock;
  relay.setOneWayDelay(std::chrono::milliseconds(400));
  const auto start = Clock::now();
  writeAll(client, "first, held 400 ms;");
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  relay.setOneWayDelay(std::chrono::milliseconds(0));
  writeAll(client, " then second, not held");
  ::shutdown(client, SHUT_WR);
  server.join();
  const auto elapsed = Clock::now() - start;
  ::close(client);
  EXPECT_EQ(received, "first, held 400 ms; then second, not held");
  EXPECT_GE(elapsed, std::chrono::milliseconds(400));  // the first bytes were held (a lower bound only)
}

/// Jitter draws each chunk's extra delay at random: a chunk may draw less
/// than the one before it, and must still leave after it (a TCP stream).
TEST(DelayRelay, JitterKeepsTheBytesInOrder) {
  Listener target;
  DelayRelayOptions options = relayTo(target.port, std::chrono::milliseconds(0));
  options.jitter = std::chrono::milliseconds(60);
  options.seed = 5;
  DelayRelay relay(options);
  std::string received;
  std::thread server([&] {
    int fd = ::accept(target.fd, nullptr, nullptr);
    received = readAll(fd);
    ::close(fd);
  });
  int client = connectTo(options.listenPort);
  ASSERT_GE(client, 0);
  std::string sent;
  for (int i = 0; i < 40; ++i) {
    // Apart in time, so that each is a read of its own with a draw of its own.
    const std::string piece = "<" + std::to_string(i) + ">";
    writeAll(client, piece);
    sent += piece;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ::shutdown(client, SHUT_WR);
  server.join();
  ::close(client);
  EXPECT_EQ(received, sent);
}

TEST(DelayRelay, ANegativeJitterIsRefused) {
  Listener target;
  DelayRelayOptions options = relayTo(target.port, std::chrono::milliseconds(0));
  options.jitter = std::chrono::milliseconds(-1);
  EXPECT_THROW(DelayRelay relay(options), std::exception);
}

}  // namespace
}  // namespace vmsync
