#include "vm_registry.h"

#include <spdlog/spdlog.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "base/audit_log.h"
#include "base/durable_file.h"
#include "base/error.h"

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

/// What a single-VM data directory held at its top, beside state.json.
constexpr const char* kSingleVmEntries[] = {"checkpoints", "abandoned", "compaction", "resync"};

}  // namespace

VmRegistry::VmRegistry(std::string dataDir, VmSettings settings) : dir_(std::move(dataDir)), settings_(settings) {
  makePrivateDirectory(dir_);
  adoptSingleVmLayout();
  makePrivateDirectory(dir_ + "/vms");
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
  for (const auto& [user, name] : found) open(user, name);
  spdlog::info("sync server: {} VM{} in {}", vms_.size(), vms_.size() == 1 ? "" : "s", dir_);
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
  makePrivateDirectory(dir_ + "/vms");
  makePrivateDirectory(dir_ + "/vms/" + userDirectory(owner));
  makePrivateDirectory(target);
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
    makePrivateDirectory(dir_ + "/vms/" + userDir);
    makePrivateDirectory(dir);
    auto vm = std::make_unique<SyncServer>(dir, settings_.compaction, settings_.timer, settings_.recovery);
    vm->setIdentity(userOfDirectory(userDir), name);
    vm->setLeaseTimeout(settings_.leaseTimeout);
    vm->setAuditLog(settings_.audit);
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
  if (settings_.audit)
    settings_.audit->record(
        {.action = action, .result = "refused", .user = peer.user, .device = peer.device, .reason = reason});
  fail("{}", reason);
}

void VmRegistry::revoked(const std::string& user, const std::string& device, const std::string& why) {
  const std::string prefix = userDirectory(user) + "/";
  for (const auto& [key, vm] : vms_)
    if (key.starts_with(prefix)) vm->revoked(user, device, why);
}

}  // namespace vmsync
