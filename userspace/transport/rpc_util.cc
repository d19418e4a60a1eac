#include "transport/rpc_util.h"

#include <arpa/inet.h>

#include <netinet/in.h>
#include <linux/tcp.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>

#include <capnp/serialize-async.h>
#include <capnp/serialize.h>


namespace vmsync {

namespace {
std::atomic<int> deadLinkTimeout{kDefaultDeadLinkSeconds};
}  // namespace

int deadLinkSeconds() { return deadLinkTimeout.load(); }

void setDeadLinkSeconds(int seconds) {
  if (seconds < kMinDeadLinkSeconds)
    throw Error(fmt::format("dead-link timeout of {} s: it must be at least {} s", seconds, kMinDeadLinkSeconds));
  deadLinkTimeout = seconds;
}

DeadLinkProbes deadLinkProbes(int seconds) {
  DeadLinkProbes p;
  p.idleSeconds = std::clamp(seconds / 4, 1, 5);
  p.intervalSeconds = std::clamp(seconds / 6, 1, 2);
  // Linux takes at most 127 probes: a long timeout spaces them out.
  constexpr int kMaxProbes = 127;
  p.intervalSeconds = std::max(p.intervalSeconds, (seconds - p.idleSeconds + kMaxProbes - 1) / kMaxProbes);
  p.count = std::max(1, (seconds - p.idleSeconds) / p.intervalSeconds);
  p.userTimeoutMs = static_cast<unsigned>(seconds) * 1000u;
  return p;
}

bool detectDeadLink(const SetSocketOption& set) {
  const DeadLinkProbes p = deadLinkProbes(deadLinkSeconds());
  int on = 1;
  bool ok = set(SOL_SOCKET, SO_KEEPALIVE, &on, sizeof on);
  ok &= set(IPPROTO_TCP, TCP_KEEPIDLE, &p.idleSeconds, sizeof p.idleSeconds);
  ok &= set(IPPROTO_TCP, TCP_KEEPINTVL, &p.intervalSeconds, sizeof p.intervalSeconds);
  ok &= set(IPPROTO_TCP, TCP_KEEPCNT, &p.count, sizeof p.count);
  ok &= set(IPPROTO_TCP, TCP_USER_TIMEOUT, &p.userTimeoutMs, sizeof p.userTimeoutMs);
  return ok;
}

namespace {

/// A dead link (a phone out of coverage) must end the connection in seconds,
/// so that the device reconnects, not after TCP's quarter of an hour.
void detectDeadLinkOn(kj::AsyncIoStream& stream) {
  std::string refused;
  detectDeadLink([&](int level, int name, const void* value, unsigned length) {
    if (!refused.empty()) return false;  // one refusal: the stream takes none
    try {
      stream.setsockopt(level, name, value, length);
      return true;
    } catch (const kj::Exception& e) {
      if (refused.empty()) refused = describe(e);
      return false;
    }
  });
  if (!refused.empty()) spdlog::debug("connection: no dead-link detection: {}", refused);
}

}  // namespace

void rpcFail(const std::string& message) {
  kj::throwFatalException(kj::Exception(kj::Exception::Type::FAILED, __FILE__, __LINE__, kj::str(message.c_str())));
}

std::string describe(const kj::Exception& e) {
  std::string text = e.getDescription().cStr();
  for (const char* prefix : {"remote exception: ", "std::exception: "})
    if (text.rfind(prefix, 0) == 0) text.erase(0, std::string(prefix).size());
  return text;
}

capnp::ReaderOptions rpcReaderOptions() {
  capnp::ReaderOptions options;
  options.traversalLimitInWords = kMaxMessageBytes / sizeof(capnp::word);
  return options;
}

std::uint64_t traversalLimitFor(std::uint64_t words) {
  const std::uint64_t most = kMaxMessageBytes / sizeof(capnp::word);
  if (words >= most / kTraversalPerWord) return most;
  return std::max(kMinTraversalWords, words * kTraversalPerWord);
}

namespace {

/// A message stream whose messages are read under a traversal limit that
/// follows their size (see traversalLimitFor). The segments are those the
/// inner stream read; only the reader over them is new.
class SizedMessageStream final : public capnp::MessageStream {
 public:
  explicit SizedMessageStream(kj::AsyncIoStream& stream) : inner_(stream) {}

  kj::Promise<kj::Maybe<capnp::MessageReaderAndFds>> tryReadMessage(kj::ArrayPtr<kj::AutoCloseFd> fdSpace,
                                                                     capnp::ReaderOptions options,
                                                                     kj::ArrayPtr<capnp::word> scratch) override {
    return inner_.tryReadMessage(fdSpace, options, scratch)
        .then([options](kj::Maybe<capnp::MessageReaderAndFds> read) -> kj::Maybe<capnp::MessageReaderAndFds> {
          KJ_IF_MAYBE(message, read) {
            kj::Vector<kj::ArrayPtr<const capnp::word>> segments;
            std::uint64_t words = 0;
            for (uint id = 0;; ++id) {
              auto segment = message->reader->getSegment(id);
              if (segment == nullptr) break;
              words += segment.size();
              segments.add(segment);
            }
            capnp::ReaderOptions sized = options;
            sized.traversalLimitInWords = std::min(options.traversalLimitInWords, traversalLimitFor(words));
            auto array = segments.releaseAsArray();
            auto reader = kj::heap<capnp::SegmentArrayMessageReader>(array.asPtr(), sized);
            return capnp::MessageReaderAndFds{reader.attach(kj::mv(array), kj::mv(message->reader)), message->fds};
          }
          return nullptr;
        });
  }
  kj::Promise<void> writeMessage(kj::ArrayPtr<const int> fds,
                                 kj::ArrayPtr<const kj::ArrayPtr<const capnp::word>> segments) override {
    return inner_.writeMessage(fds, segments);
  }
  kj::Promise<void> writeMessages(
      kj::ArrayPtr<kj::ArrayPtr<const kj::ArrayPtr<const capnp::word>>> messages) override {
    return inner_.writeMessages(messages);
  }
  kj::Maybe<int> getSendBufferSize() override { return inner_.getSendBufferSize(); }
  kj::Promise<void> end() override { return inner_.end(); }

 private:
  capnp::AsyncIoMessageStream inner_;
};

}  // namespace

RpcConnection::RpcConnection(kj::Own<kj::AsyncIoStream> stream, capnp::rpc::twoparty::Side side,
                             capnp::Capability::Client bootstrap)
    : stream_(kj::mv(stream)),
      messages_(kj::heap<SizedMessageStream>(*stream_)),
      network_(*messages_, side, rpcReaderOptions()),
      rpc_(capnp::makeRpcServer(network_, kj::mv(bootstrap))) {
  detectDeadLinkOn(*stream_);
}

std::optional<std::uint64_t> RpcConnection::bytesAcknowledged() {
  tcp_info info{};
  uint length = sizeof info;
  try {
    stream_->getsockopt(IPPROTO_TCP, TCP_INFO, &info, &length);
  } catch (const kj::Exception&) {
    return std::nullopt;
  }
  if (length < offsetof(tcp_info, tcpi_bytes_acked) + sizeof info.tcpi_bytes_acked) return std::nullopt;
  return info.tcpi_bytes_acked;
}

std::optional<std::string> RpcConnection::localAddress() {
  sockaddr_storage address{};
  uint length = sizeof address;
  try {
    stream_->getsockname(reinterpret_cast<sockaddr*>(&address), &length);
  } catch (const kj::Exception&) {
    return std::nullopt;
  }
  char text[INET6_ADDRSTRLEN] = {};
  const void* raw = nullptr;
  if (address.ss_family == AF_INET) raw = &reinterpret_cast<const sockaddr_in*>(&address)->sin_addr;
  if (address.ss_family == AF_INET6) raw = &reinterpret_cast<const sockaddr_in6*>(&address)->sin6_addr;
  if (raw == nullptr || ::inet_ntop(address.ss_family, raw, text, sizeof text) == nullptr) return std::nullopt;
  return std::string(text);
}

capnp::Capability::Client RpcConnection::bootstrap() {
  capnp::word scratch[4];
  memset(scratch, 0, sizeof scratch);
  capnp::MallocMessageBuilder message(scratch);
  auto vatId = message.getRoot<capnp::rpc::twoparty::VatId>();
  vatId.setSide(network_.getSide() == capnp::rpc::twoparty::Side::CLIENT ? capnp::rpc::twoparty::Side::SERVER
                                                                          : capnp::rpc::twoparty::Side::CLIENT);
  return rpc_.bootstrap(vatId);
}

kj::Promise<kj::Own<RpcConnection>> connectRpc(kj::AsyncIoContext& io, const std::string& address) {
  return io.provider->getNetwork().parseAddress(address).then([](kj::Own<kj::NetworkAddress> addr) {
    return addr->connect().attach(kj::mv(addr));
  }).then([](kj::Own<kj::AsyncIoStream> stream) {
    return kj::heap<RpcConnection>(kj::mv(stream), capnp::rpc::twoparty::Side::CLIENT,
                                   capnp::Capability::Client(nullptr));
  });
}

namespace {

kj::Promise<void> acceptLoop(kj::ConnectionReceiver& listener, capnp::Capability::Client bootstrap,
                             kj::Own<kj::TaskSet> tasks) {
  auto accepted = listener.accept();
  return accepted.then([&listener, bootstrap = kj::mv(bootstrap), tasks = kj::mv(tasks)](
                           kj::Own<kj::AsyncIoStream> stream) mutable {
    auto connection = kj::heap<RpcConnection>(kj::mv(stream), capnp::rpc::twoparty::Side::SERVER, bootstrap);
    auto done = connection->onDisconnect();
    tasks->add(done.attach(kj::mv(connection)));
    return acceptLoop(listener, kj::mv(bootstrap), kj::mv(tasks));
  });
}

class LogErrors final : public kj::TaskSet::ErrorHandler {
 public:
  void taskFailed(kj::Exception&& exception) override {
    spdlog::debug("connection ended: {}", exception.getDescription().cStr());
  }
};

}  // namespace

kj::Promise<void> serveRpc(kj::ConnectionReceiver& listener, capnp::Capability::Client bootstrap) {
  static LogErrors errors;
  return acceptLoop(listener, kj::mv(bootstrap), kj::heap<kj::TaskSet>(errors));
}

}  // namespace vmsync
