#include "transport/message_gate.h"

#include <fmt/format.h>

#include <chrono>
#include <cstring>
#include <spdlog/spdlog.h>

namespace vmsync {

namespace {

std::uint32_t littleEndian32(const kj::byte* p) {
  return static_cast<std::uint32_t>(p[0]) | static_cast<std::uint32_t>(p[1]) << 8 |
         static_cast<std::uint32_t>(p[2]) << 16 | static_cast<std::uint32_t>(p[3]) << 24;
}

std::string mib(std::uint64_t bytes) {
  if (bytes >= (1 << 20)) return fmt::format("{:.1f} MiB", bytes / 1048576.0);
  if (bytes >= (1 << 10)) return fmt::format("{:.1f} KiB", bytes / 1024.0);
  return fmt::format("{} bytes", bytes);
}

}  // namespace

bool ServerBudget::tryTake(std::uint64_t bytes) {
  if (!waiters_.empty() || !fits(bytes)) return false;
  used_ += bytes;
  return true;
}

kj::Promise<void> ServerBudget::take(std::uint64_t bytes) {
  if (tryTake(bytes)) return kj::READY_NOW;
  auto paf = kj::newPromiseAndFulfiller<void>();
  waiters_.push_back(Waiter{bytes, kj::mv(paf.fulfiller)});
  return kj::mv(paf.promise);
}

void ServerBudget::give(std::uint64_t bytes) {
  used_ -= std::min(used_, bytes);
  while (!waiters_.empty() && fits(waiters_.front().bytes)) {
    Waiter next = kj::mv(waiters_.front());
    waiters_.pop_front();
    // A waiter whose connection is gone takes nothing.
    if (!next.fulfiller->isWaiting()) continue;
    used_ += next.bytes;
    next.fulfiller->fulfill();
  }
}

ConnectionGate::ConnectionGate(MessageLimits limits, std::string user, std::shared_ptr<InFlightByUser> inFlight,
                               std::function<void(const std::string&)> onViolation,
                               std::shared_ptr<ServerBudget> budget)
    : limits_(limits),
      user_(std::move(user)),
      inFlight_(std::move(inFlight)),
      onViolation_(std::move(onViolation)),
      budget_(std::move(budget)) {}

void ConnectionGate::noteWaiting() {
  if (!budget_) return;
  // One line per 10 s, for the whole server.
  static std::chrono::steady_clock::time_point last;
  const auto now = std::chrono::steady_clock::now();
  if (now - last < std::chrono::seconds(10)) return;
  last = now;
  spdlog::info("backpressure: a message of {} waits for room (the server is receiving {} of messages, the limit is "
               "{}; {} more wait)", mib(serverWant_), mib(budget_->used()), mib(budget_->limit()),
               budget_->waiting());
}

kj::Promise<void> ConnectionGate::admitted() {
  if (serverWant_ == 0 || !budget_) return kj::READY_NOW;
  const std::uint64_t want = serverWant_;
  return budget_->take(want).then([this, want] {
    serverWant_ -= std::min(serverWant_, want);
    serverHeld_ += want;
  });
}

ConnectionGate::~ConnectionGate() { endMessage(); }

void ConnectionGate::endMessage() {
  // A message that came whole while it waited no longer needs room.
  serverWant_ = 0;
  if (serverHeld_ != 0) {
    budget_->give(serverHeld_);
    serverHeld_ = 0;
  }
  if (reserved_ == 0 || !inFlight_) return;
  auto it = inFlight_->find(user_);
  if (it != inFlight_->end()) {
    it->second -= std::min(it->second, reserved_);
    if (it->second == 0) inFlight_->erase(it);
  }
  reserved_ = 0;
}

std::string ConnectionGate::startMessage(std::uint64_t total) {
  if (!authorized_) {
    if (total > limits_.beforeAuthorization)
      return fmt::format("a message of {} before the connection was authorized (the limit is {})", mib(total),
                         mib(limits_.beforeAuthorization));
    return {};
  }
  if (total > limits_.perMessage)
    return fmt::format("a message of {} (the limit is {})", mib(total), mib(limits_.perMessage));
  if (inFlight_) {
    std::uint64_t& used = (*inFlight_)[user_];
    if (used + total > limits_.perUser)
      return fmt::format("a message of {} while user {}'s connections were already receiving {} (the limit is {})",
                         mib(total), user_, mib(used), mib(limits_.perUser));
    used += total;
    reserved_ = total;
  }
  if (budget_ && !budget_->tryTake(total)) serverWant_ = total;
  else if (budget_) serverHeld_ = total;
  return {};
}

std::string ConnectionGate::take(const kj::byte* bytes, std::size_t size) {
  if (violated_) return "the connection broke a limit before";
  while (size > 0) {
    if (bodyLeft_ > 0) {
      const std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(bodyLeft_, size));
      bodyLeft_ -= n;
      bytes += n;
      size -= n;
      if (bodyLeft_ == 0) endMessage();
      continue;
    }
    // The segment table: a 32-bit count less one, a 32-bit size in words per
    // segment, padded to a whole word.
    const std::size_t n = std::min(headerNeed_ - headerHave_, size);
    std::memcpy(header_ + headerHave_, bytes, n);
    headerHave_ += n;
    bytes += n;
    size -= n;
    if (headerHave_ < headerNeed_) continue;
    if (headerNeed_ == 4) {
      const std::uint64_t segments = std::uint64_t{littleEndian32(header_)} + 1;
      if (segments > 512) {
        violated_ = true;
        std::string why = fmt::format("a message of {} segments (Cap'n Proto allows 512)", segments);
        onViolation_(why);
        return why;
      }
      headerNeed_ = 4 + 4 * segments;
      headerNeed_ += headerNeed_ % 8;
      continue;
    }
    // The padding word (an even count of segments) is not a segment.
    const std::uint64_t segments = std::uint64_t{littleEndian32(header_)} + 1;
    std::uint64_t words = 0;
    for (std::uint64_t s = 0; s < segments; ++s) words += littleEndian32(header_ + 4 + 4 * s);
    const std::uint64_t body = words * 8;
    const std::uint64_t table = headerNeed_;
    headerHave_ = 0;
    headerNeed_ = 4;
    std::string why = startMessage(table + body);
    if (!why.empty()) {
      violated_ = true;
      onViolation_(why);
      return why;
    }
    bodyLeft_ = body;
    if (bodyLeft_ == 0) endMessage();
  }
  return {};
}

namespace {

class GatedStream final : public kj::AsyncIoStream {
 public:
  GatedStream(kj::Own<kj::AsyncIoStream> inner, std::shared_ptr<ConnectionGate> gate)
      : inner_(kj::mv(inner)), gate_(std::move(gate)) {}

  kj::Promise<size_t> tryRead(void* buffer, size_t minBytes, size_t maxBytes) override {
    return inner_->tryRead(buffer, minBytes, maxBytes).then([this, buffer](size_t n) -> kj::Promise<size_t> {
      std::string why = gate_->take(static_cast<const kj::byte*>(buffer), n);
      if (!why.empty())
        kj::throwFatalException(kj::Exception(kj::Exception::Type::FAILED, __FILE__, __LINE__,
                                              kj::str("connection closed: ", why.c_str())));
      // A message the server has no room for yet: its header is handed on
      // (and room made for its body) only once others' messages are in.
      if (gate_->waitingFor() == 0) return n;
      gate_->noteWaiting();
      return gate_->admitted().then([n] { return n; });
    });
  }
  kj::Maybe<uint64_t> tryGetLength() override { return inner_->tryGetLength(); }
  kj::Promise<void> write(const void* buffer, size_t size) override { return inner_->write(buffer, size); }
  kj::Promise<void> write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) override {
    return inner_->write(pieces);
  }
  kj::Promise<void> whenWriteDisconnected() override { return inner_->whenWriteDisconnected(); }
  void shutdownWrite() override { inner_->shutdownWrite(); }
  void abortRead() override { inner_->abortRead(); }
  void getsockopt(int level, int option, void* value, uint* length) override {
    inner_->getsockopt(level, option, value, length);
  }
  void setsockopt(int level, int option, const void* value, uint length) override {
    inner_->setsockopt(level, option, value, length);
  }
  void getsockname(struct sockaddr* addr, uint* length) override { inner_->getsockname(addr, length); }
  void getpeername(struct sockaddr* addr, uint* length) override { inner_->getpeername(addr, length); }

 private:
  kj::Own<kj::AsyncIoStream> inner_;
  std::shared_ptr<ConnectionGate> gate_;
};

}  // namespace

kj::Own<kj::AsyncIoStream> gatedStream(kj::Own<kj::AsyncIoStream> inner, std::shared_ptr<ConnectionGate> gate) {
  return kj::heap<GatedStream>(kj::mv(inner), std::move(gate));
}

}  // namespace vmsync
