#include "transport/address_watch.h"

#include <arpa/inet.h>
#include <errno.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <sys/socket.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include <cstring>
#include <set>

namespace vmsync {

AddressWatch::AddressWatch(kj::UnixEventPort& port, std::function<void(const std::string&)> gone)
    : gone_(std::move(gone)) {
  fd_ = ::socket(AF_NETLINK, SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC, NETLINK_ROUTE);
  sockaddr_nl local{};
  local.nl_family = AF_NETLINK;
  local.nl_groups = RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR;
  if (fd_ < 0 || ::bind(fd_, reinterpret_cast<sockaddr*>(&local), sizeof local) != 0) {
    unavailable_ = std::string("no netlink address notifications: ") + std::strerror(errno);
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
    return;
  }
  observer_ = kj::heap<kj::UnixEventPort::FdObserver>(port, fd_, kj::UnixEventPort::FdObserver::OBSERVE_READ);
  task_ = watch().eagerlyEvaluate([](kj::Exception&& e) {
    spdlog::warn("address watch stopped: {}", e.getDescription().cStr());
  });
}

AddressWatch::~AddressWatch() {
  task_ = nullptr;
  observer_ = nullptr;
  if (fd_ >= 0) ::close(fd_);
}

kj::Promise<void> AddressWatch::watch() {
  return observer_->whenBecomesReadable().then([this] {
    drain();
    return watch();
  });
}

void AddressWatch::drain() {
  std::set<std::string> removed;
  alignas(nlmsghdr) char buffer[16384];
  for (;;) {
    const ssize_t n = ::recv(fd_, buffer, sizeof buffer, MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK)
        spdlog::debug("address watch: {}", std::strerror(errno));  // ENOBUFS: notifications were lost
      break;
    }
    auto length = static_cast<unsigned>(n);
    for (auto* h = reinterpret_cast<nlmsghdr*>(buffer); NLMSG_OK(h, length); h = NLMSG_NEXT(h, length)) {
      if (h->nlmsg_type != RTM_DELADDR) continue;
      auto* address = static_cast<ifaddrmsg*>(NLMSG_DATA(h));
      int attributesLength = static_cast<int>(IFA_PAYLOAD(h));
      for (auto* a = IFA_RTA(address); RTA_OK(a, attributesLength); a = RTA_NEXT(a, attributesLength)) {
        if (a->rta_type != IFA_LOCAL && a->rta_type != IFA_ADDRESS) continue;
        char text[INET6_ADDRSTRLEN] = {};
        if (::inet_ntop(address->ifa_family, RTA_DATA(a), text, sizeof text) != nullptr) removed.insert(text);
      }
    }
  }
  for (const auto& address : removed) gone_(address);
}

}  // namespace vmsync
