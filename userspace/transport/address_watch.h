// Notices when one of this host's addresses (in this network namespace) goes
// away, as when a phone moves from one network to another: a connection
// from that address is then dead, and waiting for the dead-link timeout to
// say so costs the user 20 s of sync.
#pragma once

#include <kj/async-unix.h>

#include <functional>
#include <string>

namespace vmsync {

class AddressWatch {
 public:
  /// Calls `gone` with each address (as inet_ntop writes it) removed from
  /// an interface, from the event loop of `port`. When the kernel refuses
  /// the netlink socket, unavailable() says why and nothing is watched.
  AddressWatch(kj::UnixEventPort& port, std::function<void(const std::string&)> gone);
  ~AddressWatch();
  AddressWatch(const AddressWatch&) = delete;
  AddressWatch& operator=(const AddressWatch&) = delete;

  /// Empty while watching, else why not.
  const std::string& unavailable() const { return unavailable_; }

 private:
  kj::Promise<void> watch();
  /// Reads every message queued on the socket and reports removed addresses.
  void drain();

  int fd_ = -1;
  std::function<void(const std::string&)> gone_;
  std::string unavailable_;
  kj::Own<kj::UnixEventPort::FdObserver> observer_;
  kj::Promise<void> task_ = nullptr;
};

}  // namespace vmsync
