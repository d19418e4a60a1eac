// Many VMs on one server: each user's by name, in a directory of its own;
// another user's VM is refused whatever the request; a data directory from
// before VMs had names is adopted whole, even after a crash halfway.
#include <gtest/gtest.h>
#include <kj/async.h>

#include <cstdio>
#include <filesystem>
#include <memory>
#include <thread>

#include "base/error.h"
#include "test_checkpoint.h"
#include "test_env.h"
#include "vm_registry.h"

namespace vmsync {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;

class Standby final : public wire::DevicePeer::Server {};

PeerIdentity device(const std::string& user, const std::string& name) {
  return PeerIdentity{.authenticated = true, .user = user, .device = name};
}

/// Pushes checkpoint `sequence` (of `kind`) of `vm` from `device` under lease `epoch`.
void pushOne(SyncServer& server, const std::string& device, const std::string& vm, std::uint64_t sequence,
             std::uint64_t epoch, wire::CheckpointKind kind = wire::CheckpointKind::INCREMENTAL) {
  auto checkpoint = testCheckpoint(sequence, epoch, kind);
  auto root = checkpoint->getRoot<wire::Checkpoint>();
  root.setOrigin(device);
  root.setVmId(vm);
  if (sequence == 1) root.getSpec().setVmId(vm);
  server.push(device, root.asReader());
}

/// Registers `peer`'s device for `vm` (creating it), takes the lease and
/// pushes checkpoints 1..count; returns the lease epoch.
std::uint64_t runAndPush(VmRegistry& vms, const PeerIdentity& peer, const std::string& vm, std::uint64_t count,
                         kj::WaitScope& waitScope) {
  SyncServer& server = vms.vm(peer, vm, "use", /*create=*/true);
  server.registerDevice(peer.device, kj::heap<Standby>(), 0, 0, false).wait(waitScope);
  const std::uint64_t epoch = server.acquireLease(peer.device);
  for (std::uint64_t s = 1; s <= count; ++s) pushOne(server, peer.device, vm, s, epoch);
  return epoch;
}

/// Where VM directory `vm` keeps checkpoint `sequence`.
std::string checkpointFile(const std::string& vm, std::uint64_t sequence) {
  char name[32];
  std::snprintf(name, sizeof name, "%020llu.ckpt", static_cast<unsigned long long>(sequence));
  return vm + "/checkpoints/" + name;
}

/// The text of the Error `body` throws ("" when it throws none).
template <typename F>
std::string errorOf(F&& body) {
  try {
    body();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(VmRegistry, EachUserHasVmsOfTheirOwnByName) {
  kj::EventLoop loop;
  kj::WaitScope waitScope(loop);
  TempDir dir;
  VmRegistry vms(dir.path(), {});
  const PeerIdentity alice = device("alice", "phone"), bob = device("bob", "laptop");
  runAndPush(vms, alice, "vm", 3, waitScope);
  runAndPush(vms, alice, "work", 1, waitScope);
  runAndPush(vms, bob, "vm", 2, waitScope);  // the same name: another VM

  EXPECT_EQ(vms.vm(alice, "", "list", false).head(), 3u);
  EXPECT_EQ(vms.vm(alice, "alice/vm", "list", false).head(), 3u);
  EXPECT_EQ(vms.vm(alice, "work", "list", false).head(), 1u);
  EXPECT_EQ(vms.vm(bob, "vm", "list", false).head(), 2u);
  EXPECT_TRUE(fs::exists(checkpointFile(dir.path() + "/vms/alice/vm", 3)));
  EXPECT_TRUE(fs::exists(checkpointFile(dir.path() + "/vms/bob/vm", 2)));
  std::vector<std::string> mine;
  for (SyncServer* vm : vms.vmsOf(alice)) mine.push_back(vm->label());
  EXPECT_EQ(mine, (std::vector<std::string>{"alice/vm", "alice/work"}));
  ASSERT_EQ(vms.vmsOf(bob).size(), 1u);
  EXPECT_EQ(vms.vmsOf(bob)[0]->label(), "bob/vm");
  // A server without TLS lists every VM.
  EXPECT_EQ(vms.vmsOf(PeerIdentity{}).size(), 3u);
}

TEST(VmRegistry, AnotherUsersVmIsRefusedForEveryAction) {
  kj::EventLoop loop;
  kj::WaitScope waitScope(loop);
  TempDir dir;
  VmRegistry vms(dir.path(), {});
  const PeerIdentity alice = device("alice", "phone"), mallory = device("mallory", "laptop");
  runAndPush(vms, alice, "work", 1, waitScope);
  for (const char* action : {"use", "list", "switch", "stop"}) {
    const std::string why = errorOf([&] { vms.vm(mallory, "alice/work", action, /*create=*/true); });
    EXPECT_NE(why.find(std::string("device laptop of user mallory may not ") + action + " VM 'alice/work': it belongs "
                       "to user alice"), std::string::npos) << why;
  }
  // Her own "work" is not alice's, and does not exist until she creates it.
  const std::string missing = errorOf([&] { vms.vm(mallory, "work", "list", false); });
  EXPECT_NE(missing.find("user mallory has no VM 'work'"), std::string::npos) << missing;
  EXPECT_FALSE(fs::exists(dir.path() + "/vms/mallory"));
  EXPECT_EQ(vms.vmsOf(mallory).size(), 0u);
  // Names that would leave the user's directory are refused.
  for (const char* bad : {"..", "a/../../alice/work", "x y", "mallory/../alice"}) {
    const std::string why = errorOf([&] { vms.vm(mallory, bad, "use", true); });
    EXPECT_NE(why, "") << bad << " was accepted";
  }
  EXPECT_EQ(vms.vms().size(), 1u);
}

TEST(VmRegistry, AUserPastTheVmLimitIsRefusedAndOthersAreNot) {
  kj::EventLoop loop;
  kj::WaitScope waitScope(loop);
  TempDir dir;
  VmSettings settings;
  settings.user.vms = 2;
  VmRegistry vms(dir.path(), settings);
  const PeerIdentity alice = device("alice", "phone"), bob = device("bob", "laptop");
  vms.vm(alice, "a", "use", true);
  vms.vm(alice, "b", "use", true);
  const std::string why = errorOf([&] { vms.vm(alice, "c", "use", true); });
  EXPECT_NE(why.find("user alice has 2 VMs, the most this server allows each user"), std::string::npos) << why;
  EXPECT_FALSE(fs::exists(dir.path() + "/vms/alice/c"));
  EXPECT_NO_THROW(vms.vm(alice, "a", "use", true));  // an existing one is not a new one
  EXPECT_NO_THROW(vms.vm(bob, "c", "use", true));
}

TEST(VmRegistry, APushPastAUsersStoredBytesIsRefusedAndASwitchsFinalIsNot) {
  kj::EventLoop loop;
  kj::WaitScope waitScope(loop);
  TempDir dir;
  const PeerIdentity alice = device("alice", "phone"), bob = device("bob", "laptop");
  std::uint64_t stored = 0;
  {
    VmRegistry vms(dir.path(), {});
    runAndPush(vms, alice, "work", 2, waitScope);
    runAndPush(vms, alice, "home", 1, waitScope);
    for (SyncServer* vm : vms.vmsOf(alice)) stored += vm->chainBytes();
  }
  ASSERT_GT(stored, 3u * kUnitSize);
  VmSettings settings;
  settings.user.storedBytes = stored + 100;  // room for no whole checkpoint more
  VmRegistry vms(dir.path(), settings);
  SyncServer& work = vms.vm(alice, "work", "use", false);
  work.registerDevice("phone", kj::heap<Standby>(), 2, 1, false).wait(waitScope);
  const std::uint64_t epoch = work.acquireLease("phone");
  const std::string why = errorOf([&] { pushOne(work, "phone", "work", 3, epoch); });
  EXPECT_NE(why.find("checkpoint 3 of VM alice/work refused: user alice stores"), std::string::npos) << why;
  EXPECT_NE(why.find("--max-user-stored-mb"), std::string::npos) << why;
  EXPECT_EQ(work.head(), 2u);
  // A resumable point counts as well; the final checkpoint of a switch or a
  // park does not, so the VM can always be moved or parked.
  auto resumable = testCheckpoint(3, epoch, wire::CheckpointKind::FINAL);
  resumable->getRoot<wire::Checkpoint>().setVmId("work");
  resumable->getRoot<wire::Checkpoint>().setVmContinued(true);
  EXPECT_NE(errorOf([&] { work.push("phone", resumable->getRoot<wire::Checkpoint>().asReader()); }), "");
  pushOne(work, "phone", "work", 3, epoch, wire::CheckpointKind::FINAL);
  EXPECT_EQ(work.head(), 3u);
  // Another user's quota is their own.
  EXPECT_NO_THROW(runAndPush(vms, bob, "work", 2, waitScope));
}

TEST(VmRegistry, ADamagedVmIsOutOfServiceAndTheOthersAreServed) {
  kj::EventLoop loop;
  kj::WaitScope waitScope(loop);
  TempDir dir;
  const PeerIdentity alice = device("alice", "phone"), bob = device("bob", "laptop");
  {
    VmRegistry vms(dir.path(), {});
    runAndPush(vms, alice, "work", 3, waitScope);
    runAndPush(vms, bob, "vm", 2, waitScope);
  }
  // The head record of alice's VM loses its last byte.
  const std::string head = checkpointFile(dir.path() + "/vms/alice/work", 3);
  fs::resize_file(head, fs::file_size(head) - 1);

  std::unique_ptr<VmRegistry> vms;
  ASSERT_NO_THROW(vms = std::make_unique<VmRegistry>(dir.path(), VmSettings{})) << "one damaged VM stopped the server";
  EXPECT_EQ(vms->vm(bob, "vm", "use", false).head(), 2u);
  for (const char* action : {"use", "list", "switch"}) {
    const std::string why = errorOf([&] { vms->vm(alice, "work", action, /*create=*/true); });
    EXPECT_NE(why.find("VM 'alice/work' is out of service: "), std::string::npos) << why;
    EXPECT_NE(why.find("checkpoint 3, the head of the chain, is damaged"), std::string::npos) << why;
  }
  EXPECT_TRUE(fs::exists(head)) << "the damaged record was touched";
  EXPECT_EQ(vms->vmsOf(alice).size(), 0u);
}

TEST(VmRegistry, PushesPastAUsersCheckpointRateAreRefusedUntilItRefills) {
  kj::EventLoop loop;
  kj::WaitScope waitScope(loop);
  TempDir dir;
  VmSettings settings;
  settings.user.checkpointsPerSecond = 0.3;  // a burst of 3
  VmRegistry vms(dir.path(), settings);
  const PeerIdentity alice = device("alice", "phone");
  const std::uint64_t epoch = runAndPush(vms, alice, "work", 3, waitScope);
  SyncServer& work = vms.vm(alice, "work", "use", false);
  const std::string why = errorOf([&] { pushOne(work, "phone", "work", 4, epoch); });
  EXPECT_NE(why.find("user alice pushes more than 0.3 checkpoints per second (--max-user-checkpoint-rate)"),
            std::string::npos)
      << why;
  EXPECT_EQ(work.head(), 3u);
  // Her other VMs share her rate; bob's is his own.
  EXPECT_NE(errorOf([&] { runAndPush(vms, alice, "home", 1, waitScope); }), "");
  EXPECT_NO_THROW(runAndPush(vms, device("bob", "laptop"), "work", 3, waitScope));
  std::this_thread::sleep_for(std::chrono::milliseconds(3400));  // one checkpoint's worth
  EXPECT_NO_THROW(pushOne(work, "phone", "work", 4, epoch));
  EXPECT_NE(errorOf([&] { pushOne(work, "phone", "work", 5, epoch); }), "");
}

TEST(VmRegistry, AFullCheckpointMustCarryTheNameOfItsVm) {
  kj::EventLoop loop;
  kj::WaitScope waitScope(loop);
  TempDir dir;
  VmRegistry vms(dir.path(), {});
  const PeerIdentity alice = device("alice", "phone");
  SyncServer& work = vms.vm(alice, "work", "use", true);
  work.registerDevice("phone", kj::heap<Standby>(), 0, 0, false).wait(waitScope);
  const std::uint64_t epoch = work.acquireLease("phone");
  auto checkpoint = testCheckpoint(1, epoch);  // of VM "vm"
  const std::string why = errorOf([&] { work.push("phone", checkpoint->getRoot<wire::Checkpoint>().asReader()); });
  EXPECT_NE(why.find("full checkpoint for VM 'vm' rejected: it was pushed to VM 'alice/work'"), std::string::npos)
      << why;
  EXPECT_EQ(work.head(), 0u);
}

TEST(VmRegistry, VmsAreThereAgainAfterARestart) {
  kj::EventLoop loop;
  kj::WaitScope waitScope(loop);
  TempDir dir;
  const PeerIdentity alice = device("alice", "phone"), bob = device("bob", "laptop");
  {
    VmRegistry vms(dir.path(), {});
    runAndPush(vms, alice, "work", 4, waitScope);
    runAndPush(vms, bob, "vm", 2, waitScope);
  }
  VmRegistry vms(dir.path(), {});
  ASSERT_EQ(vms.vms().size(), 2u);
  EXPECT_EQ(vms.vm(alice, "work", "list", false).head(), 4u);
  EXPECT_EQ(vms.vm(alice, "work", "list", false).owner(), "alice");
  EXPECT_EQ(vms.vm(bob, "vm", "list", false).head(), 2u);
}

/// A data directory as a server before named VMs left it: alice's VM "vm", checkpoints 1..3.
void writeSingleVmDirectory(const std::string& dir, kj::WaitScope& waitScope) {
  SyncServer server(dir);
  const PeerIdentity alice = device("alice", "phone");
  server.vm(alice, "", "use", /*create=*/true);  // the first user's device claims it
  server.registerDevice("phone", kj::heap<Standby>(), 0, 0, false).wait(waitScope);
  const std::uint64_t epoch = server.acquireLease("phone");
  for (std::uint64_t s = 1; s <= 3; ++s)
    server.push("phone", testCheckpoint(s, epoch)->getRoot<wire::Checkpoint>().asReader());
}

TEST(VmRegistry, ASingleVmDataDirectoryBecomesItsOwnersVm) {
  kj::EventLoop loop;
  kj::WaitScope waitScope(loop);
  TempDir dir;
  writeSingleVmDirectory(dir.path(), waitScope);
  ASSERT_TRUE(fs::exists(dir.path() + "/state.json"));
  VmRegistry vms(dir.path(), {});
  ASSERT_EQ(vms.vms().size(), 1u);
  SyncServer& vm = vms.vm(device("alice", "phone"), "vm", "list", false);
  EXPECT_EQ(vm.head(), 3u);
  EXPECT_EQ(vm.label(), "alice/vm");
  EXPECT_FALSE(fs::exists(dir.path() + "/state.json"));
  EXPECT_FALSE(fs::exists(dir.path() + "/checkpoints"));
  EXPECT_TRUE(fs::exists(checkpointFile(dir.path() + "/vms/alice/vm", 3)));
  EXPECT_NE(errorOf([&] { vms.vm(device("bob", "x"), "alice/vm", "list", false); }), "");
}

TEST(VmRegistry, AMoveOfTheSingleVmLayoutCutShortIsFinishedAtTheNextStart) {
  kj::EventLoop loop;
  kj::WaitScope waitScope(loop);
  TempDir dir;
  writeSingleVmDirectory(dir.path(), waitScope);
  // A crash after the chain moved and before state.json did.
  fs::create_directories(dir.path() + "/vms/alice/vm");
  fs::rename(dir.path() + "/checkpoints", dir.path() + "/vms/alice/vm/checkpoints");
  VmRegistry vms(dir.path(), {});
  SyncServer& vm = vms.vm(device("alice", "phone"), "vm", "list", false);
  EXPECT_EQ(vm.head(), 3u);
  EXPECT_EQ(vm.owner(), "alice");
  EXPECT_FALSE(fs::exists(dir.path() + "/state.json"));
}

}  // namespace
}  // namespace vmsync
