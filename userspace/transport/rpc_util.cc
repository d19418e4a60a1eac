#include "transport/rpc_util.h"

#include <netinet/in.h>
#include <linux/tcp.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>


namespace vmsync {

bool detectDeadLink(const SetSocketOption& set) {
  int on = 1;
  int idle = kKeepaliveIdleSeconds;
  int interval = kKeepaliveIntervalSeconds;
  int count = (kDeadLinkSeconds - idle) / interval;
  unsigned userTimeoutMs = kDeadLinkSeconds * 1000u;
  bool ok = set(SOL_SOCKET, SO_KEEPALIVE, &on, sizeof on);
  ok &= set(IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
  ok &= set(IPPROTO_TCP, TCP_KEEPINTVL, &interval, sizeof interval);
  ok &= set(IPPROTO_TCP, TCP_KEEPCNT, &count, sizeof count);
  ok &= set(IPPROTO_TCP, TCP_USER_TIMEOUT, &userTimeoutMs, sizeof userTimeoutMs);
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

RpcConnection::RpcConnection(kj::Own<kj::AsyncIoStream> stream, capnp::rpc::twoparty::Side side,
                             capnp::Capability::Client bootstrap)
    : stream_(kj::mv(stream)),
      network_(*stream_, side, rpcReaderOptions()),
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
