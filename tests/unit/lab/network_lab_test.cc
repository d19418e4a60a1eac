// The network lab's lossy links: the BPF program on each end of a device's
// veth drops the share of packets its profile says, counts what it saw, sends
// packets of one MTU, and drops every packet in a flaky link's outage windows
// and none outside them; a renumbered device reaches the server from its new
// address. These need root, network namespaces and BPF: they skip without
// (and fail under VMSYNC_REQUIRE_ALL=1).
#include "lab/network_lab.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "base/error.h"
#include "test_env.h"

namespace vmsync {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

constexpr std::uint16_t kServerPort = 7411;

class LossyLink : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string missing = NetworkLab::unavailableReason();
    if (!missing.empty()) VMSYNC_SKIP_OR_FAIL(missing);
  }
};

/// A fast link (so that the test is short) with the given loss and outages.
LinkProfile testProfile(double loss, OutageSchedule outages = {}) {
  LinkProfile p;
  p.name = "test";
  p.downMbit = 200;
  p.upMbit = 200;
  p.queueMs = 50;
  p.downLoss = loss;
  p.upLoss = loss;
  p.jitter = milliseconds(2);
  p.outages = outages;
  return p;
}

sockaddr_in socketAddress(const std::string& host, std::uint16_t port) {
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  ::inet_pton(AF_INET, host.c_str(), &addr.sin_addr);
  return addr;
}

/// A socket of `type` made by a thread inside network namespace `ns`.
int socketIn(const std::string& ns, int type) {
  int fd = -1;
  std::thread maker([&] {
    enterNetworkNamespace(ns);
    fd = ::socket(AF_INET, type | SOCK_CLOEXEC, 0);
  });
  maker.join();
  return fd;
}

void bindTo(int fd, const std::string& host, std::uint16_t port) {
  int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in addr = socketAddress(host, port);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0)
    throwLastErrno("bind " + host + ":" + std::to_string(port));
}

/// Connects from namespace `ns` to `address` ("host:port"); -1 when refused.
int connectFrom(const std::string& ns, const std::string& address) {
  const std::size_t colon = address.rfind(':');
  int fd = socketIn(ns, SOCK_STREAM);
  sockaddr_in addr = socketAddress(address.substr(0, colon),
                                   static_cast<std::uint16_t>(std::stoi(address.substr(colon + 1))));
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

std::string localHost(int fd) {
  sockaddr_in addr{};
  socklen_t length = sizeof addr;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &length);
  char text[INET_ADDRSTRLEN] = {};
  ::inet_ntop(AF_INET, &addr.sin_addr, text, sizeof text);
  return text;
}

/// Sends `data` from the device's namespace through its link to a listener
/// where the server would listen, and returns what arrived there.
std::string sendOverLink(NetworkLab& lab, const std::string& device, const std::string& data) {
  int listener = socketIn(lab.serverNamespace(), SOCK_STREAM);
  bindTo(listener, "127.0.0.1", kServerPort);
  ::listen(listener, 1);
  std::string received;
  std::thread server([&] {
    int fd = ::accept(listener, nullptr, nullptr);
    char buffer[65536];
    ssize_t n;
    while ((n = ::read(fd, buffer, sizeof buffer)) > 0) received.append(buffer, static_cast<std::size_t>(n));
    ::close(fd);
  });
  int client = connectFrom(lab.deviceNamespace(device), lab.serverAddressFor(device));
  EXPECT_GE(client, 0) << "cannot connect through the link";
  for (std::size_t done = 0; client >= 0 && done < data.size();) {
    ssize_t n = ::write(client, data.data() + done, data.size() - done);
    if (n <= 0) break;
    done += static_cast<std::size_t>(n);
  }
  if (client >= 0) {
    ::shutdown(client, SHUT_WR);
    ::close(client);
  } else {
    ::shutdown(listener, SHUT_RDWR);
  }
  server.join();
  ::close(listener);
  return received;
}

TEST(LinkProfiles, BadFiguresAreRefusedByName) {
  LinkProfile p = testProfile(1.5);
  try {
    checkLinkProfile(p);
    FAIL() << "a loss of 1.5 was taken";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("loss"), std::string::npos) << e.what();
  }
  p = testProfile(0.01, {milliseconds(1000), milliseconds(300), milliseconds(1200)});
  try {
    checkLinkProfile(p);
    FAIL() << "outages longer than their period were taken";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("outages"), std::string::npos) << e.what();
  }
  EXPECT_THROW(linkProfile("5g"), Error);
  for (const auto& known : linkProfiles()) EXPECT_NO_THROW(checkLinkProfile(known)) << known.name;
  EXPECT_TRUE(linkProfile("flaky").outages.any());
  EXPECT_EQ(linkProfile("lte").upLoss, 0.01);
  EXPECT_EQ(linkProfile("3g").downLoss, 0.02);
}

/// 8 MiB through real TCP over a link that loses 2 % of its packets each
/// way: the bytes arrive intact, every packet was one segment, and the share
/// the program dropped is 2 % within what chance allows.
TEST_F(LossyLink, TwoPercentLossDropsTwoPercentOfPacketsAndTcpDeliversEveryByte) {
  NetworkLab lab(kServerPort, /*seed=*/7);
  lab.addDevice("D", testProfile(0.02));
  std::string data(8 << 20, '\0');
  for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>((i * 131) ^ (i >> 12));
  const std::string received = sendOverLink(lab, "D", data);
  EXPECT_TRUE(received == data) << "received " << received.size() << " of " << data.size() << " bytes"
                                << (received.size() == data.size() ? ", altered" : "");

  const LinkTraffic traffic = lab.traffic("D");
  std::printf("up: %llu packets, %llu dropped; down: %llu packets, %llu dropped\n",
              static_cast<unsigned long long>(traffic.up.packets), static_cast<unsigned long long>(traffic.up.dropped),
              static_cast<unsigned long long>(traffic.down.packets),
              static_cast<unsigned long long>(traffic.down.dropped));
  // About 5,800 full segments up, retransmissions included: the binomial's
  // standard deviation is about 0.18 %; the band is some 4 of them each way.
  ASSERT_GT(traffic.up.packets, 5000u);
  const double upShare = static_cast<double>(traffic.up.dropped) / static_cast<double>(traffic.up.packets);
  EXPECT_GT(upShare, 0.013) << traffic.up.dropped << " of " << traffic.up.packets;
  EXPECT_LT(upShare, 0.027) << traffic.up.dropped << " of " << traffic.up.packets;
  // Acknowledgements down, one for every few segments: some 800 packets,
  // a standard deviation of about 0.5 %, a wider band.
  ASSERT_GT(traffic.down.packets, 400u);
  const double downShare = static_cast<double>(traffic.down.dropped) / static_cast<double>(traffic.down.packets);
  EXPECT_GT(downShare, 0.003) << traffic.down.dropped << " of " << traffic.down.packets;
  EXPECT_LT(downShare, 0.045) << traffic.down.dropped << " of " << traffic.down.packets;
  // One MTU per packet: a drop is one packet's loss, not a 64 KiB burst's.
  EXPECT_EQ(traffic.up.offloaded, 0u);
  EXPECT_EQ(traffic.down.offloaded, 0u);
  EXPECT_EQ(traffic.up.outageDropped + traffic.down.outageDropped, 0u);
}

/// A datagram sent every 2 ms each way for 4 s over a link with no loss and an
/// outage of 100-400 ms every second: each one sent inside a window is lost,
/// each one sent outside every window arrives, in both directions.
TEST_F(LossyLink, FlakyLinkDropsEverythingInItsOutagesAndNothingOutside) {
  NetworkLab lab(kServerPort, /*seed=*/11);
  lab.addDevice("D", testProfile(0, {milliseconds(1000), milliseconds(100), milliseconds(400)}));
  constexpr std::uint16_t kPort = 7412;
  constexpr int kDatagrams = 2000;
  struct Direction {
    std::string fromNs, toNs, toHost;
    std::vector<std::pair<Clock::time_point, Clock::time_point>> sent;  // around each send
    std::set<int> received;
    std::mutex mutex;  // guards `received`
    std::atomic<bool> stop{false};
    bool got(int index) {
      std::lock_guard lock(mutex);
      return received.count(index) > 0;
    }
  };
  Direction up{lab.deviceNamespace("D"), lab.serverNamespace(), lab.serverHostFor("D")};
  Direction down{lab.serverNamespace(), lab.deviceNamespace("D"), lab.deviceHost("D")};
  auto run = [&](Direction& d) {
    int receiver = socketIn(d.toNs, SOCK_DGRAM);
    bindTo(receiver, d.toHost, kPort);
    timeval tick{0, 100000};
    ::setsockopt(receiver, SOL_SOCKET, SO_RCVTIMEO, &tick, sizeof tick);
    std::thread reader([&] {
      int index = 0;
      while (!d.stop)
        if (::recv(receiver, &index, sizeof index, 0) == sizeof index) {
          std::lock_guard lock(d.mutex);
          d.received.insert(index);
        }
    });
    int sender = socketIn(d.fromNs, SOCK_DGRAM);
    sockaddr_in to = socketAddress(d.toHost, kPort);
    // Neighbours resolved first, outside the measurement: until one
    // datagram came through, the link may be in an outage.
    const int warmUp = -1;
    for (int i = 0; i < 300 && !d.got(warmUp); ++i) {
      ::sendto(sender, &warmUp, sizeof warmUp, 0, reinterpret_cast<sockaddr*>(&to), sizeof to);
      std::this_thread::sleep_for(milliseconds(10));
    }
    for (int i = 0; i < kDatagrams; ++i) {
      const auto before = Clock::now();
      ::sendto(sender, &i, sizeof i, 0, reinterpret_cast<sockaddr*>(&to), sizeof to);
      d.sent.emplace_back(before, Clock::now());
      std::this_thread::sleep_for(milliseconds(2));
    }
    std::this_thread::sleep_for(milliseconds(300));
    d.stop = true;
    reader.join();
    ::close(sender);
    ::close(receiver);
  };
  std::thread upward([&] { run(up); });
  std::thread downward([&] { run(down); });
  upward.join();
  downward.join();

  for (Direction* d : {&up, &down}) {
    const std::string name = d == &up ? "up" : "down";
    ASSERT_TRUE(d->received.count(-1)) << name << ": nothing came through at all";
    const auto windows = lab.outages("D", d->sent.front().first, d->sent.back().second);
    ASSERT_GE(windows.size(), 3u) << name;
    int inside = 0, outside = 0;
    for (int i = 0; i < kDatagrams; ++i) {
      const auto [before, after] = d->sent[static_cast<std::size_t>(i)];
      bool within = false, clear = true;
      for (const auto& w : windows) {
        if (before >= w.start && after < w.end) within = true;
        if (after >= w.start && before < w.end) clear = false;
      }
      if (within) {
        ++inside;
        EXPECT_FALSE(d->received.count(i)) << name << ": datagram " << i << " came through an outage";
      } else if (clear) {
        ++outside;
        EXPECT_TRUE(d->received.count(i)) << name << ": datagram " << i << " was lost outside every outage";
      }
    }
    // Windows of 100-400 ms in every second: a sixth to a half of the datagrams.
    EXPECT_GT(inside, kDatagrams / 10) << name;
    EXPECT_GT(outside, kDatagrams / 3) << name;
  }
  const LinkTraffic traffic = lab.traffic("D");
  EXPECT_GE(traffic.up.outageDropped, static_cast<std::uint64_t>(kDatagrams - static_cast<int>(up.received.size())));
  EXPECT_EQ(traffic.up.dropped + traffic.down.dropped, 0u);  // no loss outside the outages
}

/// A renumbered device has its new address, and reaches the server's address
/// from it; the old one is gone from its link.
TEST_F(LossyLink, ARenumberedDeviceReachesTheServerFromItsNewAddress) {
  NetworkLab lab(kServerPort);
  lab.addDevice("D", testProfile(0));
  const std::string before = lab.deviceHost("D");
  int listener = socketIn(lab.serverNamespace(), SOCK_STREAM);
  bindTo(listener, "127.0.0.1", kServerPort);
  ::listen(listener, 4);
  int first = connectFrom(lab.deviceNamespace("D"), lab.serverAddressFor("D"));
  ASSERT_GE(first, 0);
  EXPECT_EQ(localHost(first), before);
  ::close(first);

  const std::string after = lab.renumber("D");
  EXPECT_NE(after, before);
  EXPECT_EQ(lab.deviceHost("D"), after);
  int second = connectFrom(lab.deviceNamespace("D"), lab.serverAddressFor("D"));
  ASSERT_GE(second, 0) << "no connection from the new address";
  EXPECT_EQ(localHost(second), after);
  ::close(second);
  // Nothing can be bound to the old address any more.
  int stale = socketIn(lab.deviceNamespace("D"), SOCK_STREAM);
  EXPECT_THROW(bindTo(stale, before, 0), Error);
  ::close(stale);
  ::close(listener);
}

}  // namespace
}  // namespace vmsync
