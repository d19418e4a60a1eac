#include "vm_registry.h"

#include <spdlog/spdlog.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "base/audit_log.h"
#include "base/durable_file.h"
#include "base/error.h"
#include "server_metrics.h"

namespace fs = std::filesystem;

namespace vmsync {

namespace {

std::string userDirectory(const std::string& user) { return user.empty() ? kNoUserDirectory : user; }
std::string userOfDirectory(const std::string& dir) { return dir == kNoUserDirectory ? "" : dir; }

/// checkName(), and not a name the file system gives a meaning ("." and
/// "..") or hides: each is a directory name under vms/.
void checkDirectoryName(const std::string& what, const std::string& name) {
  checkName(what, name);
  if (name.front() == '.') fail("{} '{}' may not begin with '.'", what, name);
}

/// Makes directory `name` in `parent` (mode 0700) and the entry durable: a
/// chain fsynced into a directory whose own entry a power cut takes is lost
/// all the same.
void makeDurableDirectory(const std::string& parent, const std::string& name) {
  const bool made = !fs::exists(parent + "/" + name);
  makePrivateDirectory(parent + "/" + name);
  if (made) syncDirectory(parent);
}

/// What a single-VM data directory held at its top, beside state.json.
constexpr const char* kSingleVmEntries[] = {"checkpoints", "abandoned", "compaction", "resync"};

}  // namespace

VmRegistry::VmRegistry(std::string dataDir, VmSettings settings) : dir_(std::move(dataDir)), settings_(settings) {
  makePrivateDirectory(dir_);
  adoptSingleVmLayout();
  makeDurableDirectory(dir_, "vms");
  std::set<std::pair<std::string, std::string>> found;
  for (const auto& user : fs::directory_iterator(dir_ + "/vms")) {
    if (!user.is_directory()) continue;
    for (const auto& vm : fs::directory_iterator(user.path())) {
      if (!vm.is_directory()) continue;
      const std::string userDir = user.path().filename().string(), name = vm.path().filename().string();
      try {
        if (userDir != kNoUserDirectory) checkDirectoryName("user name", userDir);
        checkDirectoryName("VM name", name);
      } catch (const Error& e) {
        spdlog::warn("ignoring {}: not a VM's directory ({})", vm.path().string(), e.what());
        continue;
      }
      found.emplace(userDir, name);
    }
  }
  for (const auto& [user, name] : found) {
    // One user's damaged VM does not take the others' service down.
    try {
      open(user, name);
    } catch (const Error& e) {
      outOfService_[user + "/" + name] = e.what();
      spdlog::error("{}; the server goes on without this VM: its devices are refused until it is repaired (or "
                    "its directory removed) and the server restarted", e.what());
    }
  }
  spdlog::info("sync server: {} VM{} in {}{}", vms_.size(), vms_.size() == 1 ? "" : "s", dir_,
               outOfService_.empty() ? "" : fmt::format(", {} out of service", outOfService_.size()));
}

VmRegistry::~VmRegistry() = default;

void VmRegistry::adoptSingleVmLayout() {
  const bool single = fs::exists(dir_ + "/state.json") || fs::exists(dir_ + "/checkpoints");
  if (!single) return;
  std::string owner, name;
  if (fs::exists(dir_ + "/state.json")) {
    try {
      std::ifstream in(dir_ + "/state.json");
      const auto j = nlohmann::json::parse(in);
      owner = j.value("owner", "");
      name = j.value("vm_id", "");
    } catch (const std::exception& e) {
      fail("data directory {} holds one VM in the layout from before VMs had names, and its state.json is "
           "unreadable ({}); restore it from a backup", dir_, e.what());
    }
  }
  if (name.empty()) name = kDefaultVmName;
  try {
    checkDirectoryName("VM name", name);
    if (!owner.empty()) checkDirectoryName("user name", owner);
  } catch (const Error& e) {
    fail("data directory {} holds one VM in the layout from before VMs had names, which cannot be named here ({}); "
         "move checkpoints/, abandoned/ and state.json into {}/vms/USER/NAME by hand", dir_, e.what(), dir_);
  }
  const std::string target = dir_ + "/vms/" + userDirectory(owner) + "/" + name;
  spdlog::warn("data directory {} holds one VM in the layout from before VMs had names: moving it to {} "
               "(VM '{}' of {})", dir_, target, name, owner.empty() ? "clients without TLS" : "user " + owner);
  makeDurableDirectory(dir_, "vms");
  makeDurableDirectory(dir_ + "/vms", userDirectory(owner));
  makeDurableDirectory(dir_ + "/vms/" + userDirectory(owner), name);
  // One rename per entry, state.json last: a crash in between leaves
  // state.json at the top, and the next start moves what is left.
  auto move = [&](const std::string& entry) {
    const std::string from = dir_ + "/" + entry, to = target + "/" + entry;
    if (!fs::exists(from)) return;
    if (fs::exists(to))
      fail("cannot move {} to {}: it exists there already; compare the two and move the rest of {} into {} by hand",
           from, to, dir_, target);
    fs::rename(from, to);
  };
  for (const char* entry : kSingleVmEntries) move(entry);
  syncDirectory(target);
  syncDirectory(dir_);
  move("state.json");
  syncDirectory(target);
  syncDirectory(dir_);
  std::error_code ec;
  fs::remove(dir_ + "/state.json.tmp", ec);  // never committed
}

SyncServer& VmRegistry::open(const std::string& userDir, const std::string& name) {
  const std::string key = userDir + "/" + name;
  const std::string dir = dir_ + "/vms/" + key;
  try {
    checkDirectoryName("VM name", name);
    if (userDir != kNoUserDirectory) checkDirectoryName("user name", userDir);
    makeDurableDirectory(dir_ + "/vms", userDir);
    makeDurableDirectory(dir_ + "/vms/" + userDir, name);
    auto vm = std::make_unique<SyncServer>(dir, settings_.compaction, settings_.timer, settings_.recovery);
    vm->setIdentity(userOfDirectory(userDir), name);
    vm->setLeaseTimeout(settings_.leaseTimeout);
    vm->setAuditLog(settings_.audit);
    vm->setPushSlots(settings_.pushSlots);
    vm->setFoldSlots(settings_.foldSlots);
    if (settings_.metrics) vm->setMetrics(settings_.metrics);
    vm->setPushAdmission([this, userDir](SyncServer& vm, wire::Checkpoint::Reader checkpoint, std::uint64_t bytes) {
      admitPush(userDir, vm, checkpoint, bytes);
    });
    return *(vms_[key] = std::move(vm));
  } catch (const Error& e) {
    fail("VM {} ({}): {}", key, dir, e.what());
  } catch (const fs::filesystem_error& e) {
    fail("VM {} ({}): {}", key, dir, e.what());
  }
}

SyncServer& VmRegistry::vm(const PeerIdentity& peer, const std::string& name, const char* action, bool create) {
  std::string owner = peer.authenticated ? peer.user : "";
  std::string vmName = name.empty() ? kDefaultVmName : name;
  if (const auto slash = vmName.find('/'); slash != std::string::npos) {
    owner = vmName.substr(0, slash);
    vmName = vmName.substr(slash + 1);
    if (peer.authenticated && owner != peer.user)
      refuse(peer, action,
             fmt::format("{} may not {} VM '{}/{}': it belongs to user {}", peer.describe(), action, owner, vmName,
                         owner));
    checkDirectoryName("user name", owner);
  }
  checkDirectoryName("VM name", vmName);
  const std::string userDir = userDirectory(owner);
  const std::string key = userDir + "/" + vmName;
  if (auto out = outOfService_.find(key); out != outOfService_.end())
    refuse(peer, action,
           fmt::format("VM '{}' is out of service: {}; the server's operator must repair it (or remove its "
                       "directory) and restart the server", owner.empty() ? vmName : owner + "/" + vmName,
                       out->second));
  auto it = vms_.find(key);
  SyncServer* found = it == vms_.end() ? nullptr : it->second.get();
  if (found == nullptr) {
    if (!create)
      fail("{} no VM '{}' on this server; the first device that runs it (`vmsync active --vm {}`) creates it",
           owner.empty() ? "there is" : "user " + owner + " has", vmName, vmName);
    std::uint64_t count = 0;
    for (const auto& [k, v] : vms_) count += k.starts_with(userDir + "/");
    if (settings_.user.vms != 0 && count >= settings_.user.vms)
      refuse(peer, action,
             fmt::format("{} may not create VM '{}': {} has {} VMs, the most this server allows each user "
                         "(--max-vms-per-user)", peer.describe(), vmName,
                         owner.empty() ? "this server" : "user " + owner, count));
    found = &open(userDir, vmName);
    spdlog::info("VM {} created for {}", found->label(), peer.describe());
    if (settings_.audit)
      settings_.audit->record({.action = "create", .result = "done", .user = peer.user, .device = peer.device,
                               .vm = found->label(), .reason = "a device registered for a VM that did not exist"});
  }
  found->authorize(peer, action);
  return *found;
}

std::vector<SyncServer*> VmRegistry::vmsOf(const PeerIdentity& peer) {
  std::vector<SyncServer*> mine;
  const std::string prefix = userDirectory(peer.user) + "/";
  for (const auto& [key, vm] : vms_)
    if (!peer.authenticated || key.starts_with(prefix)) mine.push_back(vm.get());
  return mine;
}

void VmRegistry::refuse(const PeerIdentity& peer, const char* action, const std::string& reason) {
  spdlog::warn("refused: {}", reason);
  if (settings_.metrics) settings_.metrics->refused(action);
  if (settings_.audit)
    settings_.audit->record(
        {.action = action, .result = "refused", .user = peer.user, .device = peer.device, .reason = reason});
  fail("{}", reason);
}

void VmRegistry::admitPush(const std::string& userDir, SyncServer& vm, wire::Checkpoint::Reader checkpoint,
                           std::uint64_t bytes) {
  if (checkpoint.getKind() == wire::CheckpointKind::FINAL && !checkpoint.getVmContinued()) return;
  const UserLimits& limits = settings_.user;
  const std::string user = userOfDirectory(userDir);
  const std::string who = user.empty() ? std::string("this server's clients") : "user " + user;
  auto refuse = [&](const std::string& quota, const std::string& why) {
    const std::string reason = fmt::format("checkpoint {} of VM {} refused: {}; its changes go into a later one",
                                           checkpoint.getSequence(), vm.label(), why);
    spdlog::warn("{}", reason);
    // A device over a quota tries again at every interval: one line per user and quota per 10 s.
    if (settings_.audit)
      settings_.audit->recordLimited(userDir + "/" + quota, {.action = "push", .result = "refused", .user = user,
                                                             .device = std::string(checkpoint.getOrigin()),
                                                             .vm = vm.label(), .reason = reason});
    fail("{}", reason);
  };
  if (limits.storedBytes != 0) {
    std::uint64_t stored = 0;
    for (const auto& [key, other] : vms_)
      if (key.starts_with(userDir + "/")) stored += other->chainBytes();
    if (stored + bytes > limits.storedBytes) {
      // Folding the chain is what frees space: start one now.
      vm.compactNow(checkpoint.getPolicy());
      refuse("bytes", fmt::format("{} stores {:.1f} MiB of checkpoints; {:.1f} MiB more would pass the quota of "
                                  "{:.1f} MiB (--max-user-stored-mb); a fold of the chain is started to free space",
                                  who, stored / 1048576.0, bytes / 1048576.0, limits.storedBytes / 1048576.0));
    }
  }
  if (limits.checkpointsPerSecond > 0) {
    const auto now = std::chrono::steady_clock::now();
    const double burst = std::max(1.0, limits.checkpointsPerSecond * 10);
    Bucket& bucket = rates_[userDir];
    if (!bucket.started) {
      bucket = Bucket{burst, now, true};
    } else {
      const double seconds = std::chrono::duration<double>(now - bucket.refilled).count();
      bucket.tokens = std::min(burst, bucket.tokens + seconds * limits.checkpointsPerSecond);
      bucket.refilled = now;
    }
    if (bucket.tokens < 1)
      refuse("rate", fmt::format("{} pushes more than {} checkpoints per second (--max-user-checkpoint-rate)", who,
                                 limits.checkpointsPerSecond));
    bucket.tokens -= 1;
  }
}

void VmRegistry::revoked(const std::string& user, const std::string& device, const std::string& why) {
  const std::string prefix = userDirectory(user) + "/";
  for (const auto& [key, vm] : vms_)
    if (key.starts_with(prefix)) vm->revoked(user, device, why);
}

}  // namespace vmsync
